"""Every adapter in bf16 against a float64 reference, forward and gradients.

The yardstick is a dense bf16 matmul by the same (f64) weight, accumulated in f32: what the
adapter would cost if dW were materialised. An adapter's output and input gradient may have at
most 1.5x that matmul's error (errors are ||y - ref|| / ||ref||, Frobenius, which is stable
across seeds; the max error over max |ref| jumps with the binade of the largest output).
Measured over 4 seeds: forward 1.41-1.44x (MoKA, LoRA: two bf16 factors and a bf16 mid
operand against one bf16 weight), 0.96-1.02x (MoKAs, DoRA). Exception: the batched
schedule's x-gradient, 1.56-1.61x, as autodiff rounds each group's share to bf16 before the f32
sum (the chunked schedule's hand-written backward sums in f32: 1.40-1.44x). Gradients of the
adapter parameters have no dense counterpart (a dense weight gradient cot.T @ x of bf16
inputs is exact in f32), so they get an absolute bound, PARAM_GRAD_RTOL (measured <= 9.4e-3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moka_jax import nn
from moka_jax.adapters import DoRAConfig, LoRAConfig, MoKAConfig, MoKAsConfig

from tests.adapters import f64_reference as ref

M = N = 576  # SmolLM2's hidden size; the planner's r=10 gives 9 output groups
TOKENS = 96
OVER_DENSE = 1.5
BATCHED_DX_OVER_DENSE = 1.75
PARAM_GRAD_RTOL = 2.0 ** -6  # 4 bf16 unit roundoffs (2^-8)

CONFIGS = {
    "moka_chunked": MoKAConfig(r=10, schedule="chunked"),
    "moka_batched": MoKAConfig(r=10, schedule="batched"),
    "moka_ungated": MoKAConfig(r=10, gated=False),
    "mokas": MoKAsConfig(r=4),
    "lora": LoRAConfig(r=16),
    "dora": DoRAConfig(r=8),
}


def rel(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float(np.linalg.norm(u - v) / np.linalg.norm(v))


def _layer(config, seed=0):
    layer = nn.Linear(N, M, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layer.adapter = config.build(layer, "layer", nnx.Rngs(1))
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(layer.adapter):
        if not isinstance(var, nn.AdapterParam):
            continue
        if path[0] in ("b", "lora_b", "c"):   # zero at init: give dW a realistic size
            var.set_value(jnp.asarray(0.05 * rng.standard_normal(var.shape), jnp.float32))
        elif path[0] == "g":                  # a non-uniform gate
            var.set_value(jnp.asarray(rng.standard_normal(var.shape), jnp.float32))
    if config.kind == "dora":
        mag = layer.adapter.magnitude
        mag.set_value(mag[...] * jnp.asarray(1 + 0.1 * rng.random(M), jnp.float32))
    return layer


def _dense_bf16(w, v):
    """v @ w.T as a dense bf16 layer would: bf16 operands, f32 accumulation, bf16 result."""
    return jnp.matmul(jnp.asarray(v, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16).T,
                      preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _flat(tree):
    out = {}
    for key, v in tree.items():
        if v is None:
            continue
        for i, e in enumerate(v) if isinstance(v, list) else [(None, v)]:
            out[(key,) if i is None else (key, i)] = e
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_forward_and_gradients_against_float64(name):
    layer = _layer(CONFIGS[name])
    adapter, dora = layer.adapter, name == "dora"
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((TOKENS, N)), jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((TOKENS, M)), jnp.bfloat16)
    w0 = np.asarray(layer.weight(), np.float64)
    if dora:
        w, s = ref.dora_weight(adapter, w0)
        w_eff = s[:, None] * w
    else:
        w_eff = ref.delta_weight(adapter)
    y_ref = ref.f64(x) @ w_eff.T
    dx_ref, param_refs = ref.grads(adapter, x, cot, w0)

    graphdef, params, rest = nnx.split(layer, nn.AdapterParam, ...)

    def loss(params, x):
        lyr = nnx.merge(graphdef, params, rest)
        y = lyr(x) if dora else lyr.adapter.delta(x)
        return jnp.vdot(y.astype(jnp.float32), cot.astype(jnp.float32)), y

    (_, y), (g_params, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    dense_err = rel(_dense_bf16(w_eff, x), y_ref)
    dense_dx_err = rel(_dense_bf16(w_eff.T, cot), dx_ref)
    assert rel(y, y_ref) <= OVER_DENSE * dense_err, (rel(y, y_ref), dense_err)
    dx_bound = BATCHED_DX_OVER_DENSE if name == "moka_batched" else OVER_DENSE
    assert rel(dx, dx_ref) <= dx_bound * dense_dx_err, (rel(dx, dx_ref), dense_dx_err)

    got = {tuple(p[1:]): v.get_value() for p, v in nnx.to_flat_state(g_params)}
    want = _flat(param_refs)
    assert set(got) == set(want)
    for key, v in want.items():
        assert got[key].dtype == jnp.float32  # f32 parameters get f32 gradients
        assert rel(got[key], v) <= PARAM_GRAD_RTOL, (key, rel(got[key], v))
