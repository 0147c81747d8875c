"""LoRA and DoRA against PEFT on the same base weight and factors (f32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

from moka_jax import nn
from moka_jax.adapters import DoRAConfig, LoRAConfig

TOL = 1e-5


class Net(torch.nn.Module):
    def __init__(self, n, m):
        super().__init__()
        self.lin = torch.nn.Linear(n, m, bias=False)

    def forward(self, x):
        return self.lin(x)


def _pair(dora: bool, n=40, m=24, r=4, alpha=8.0, seed=0):
    torch.manual_seed(seed)
    net = Net(n, m)
    w0 = net.lin.weight.detach().numpy().copy()
    pm = get_peft_model(net, LoraConfig(target_modules=["lin"], r=r, lora_alpha=alpha,
                                        lora_dropout=0.0, use_dora=dora))
    lin = pm.base_model.model.lin
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((r, n)).astype(np.float32)
    b = rng.standard_normal((m, r)).astype(np.float32) * 0.1
    with torch.no_grad():
        lin.lora_A["default"].weight.copy_(torch.from_numpy(a))
        lin.lora_B["default"].weight.copy_(torch.from_numpy(b))
    cfg = DoRAConfig(r=r, alpha=alpha) if dora else LoRAConfig(r=r, alpha=alpha)
    layer = nn.Linear.from_weight(w0)
    layer.adapter = cfg.build(layer, "lin", nnx.Rngs(0))
    layer.adapter.lora_a.set_value(jnp.asarray(a))
    layer.adapter.lora_b.set_value(jnp.asarray(b))
    if dora:  # PEFT initialises the magnitude from W0 (+ dW at the time it is created)
        mag = lin.lora_magnitude_vector["default"].weight.detach().numpy()
        layer.adapter.magnitude.set_value(jnp.asarray(mag * (1 + 0.1 * rng.random(m, np.float32))))
        with torch.no_grad():
            lin.lora_magnitude_vector["default"].weight.copy_(
                torch.from_numpy(np.asarray(layer.adapter.magnitude[...])))
    return pm, layer, w0


@pytest.mark.parametrize("dora", [False, True])
def test_forward_matches_peft(dora):
    pm, layer, _ = _pair(dora)
    x = np.random.default_rng(5).standard_normal((3, 7, 40)).astype(np.float32)
    with torch.no_grad():
        y_ref = pm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(layer(x)), y_ref, rtol=TOL, atol=TOL * np.abs(y_ref).max())


@pytest.mark.parametrize("dora", [False, True])
def test_gradients_match_peft(dora):
    # PEFT's DoRA treats the weight norm as a constant (DoRA paper, section 4.3); dB without
    # that stop_gradient differs by about half, so this pins it.
    pm, layer, _ = _pair(dora)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 7, 40)).astype(np.float32)
    cot = rng.standard_normal((3, 7, 24)).astype(np.float32)
    lin = pm.base_model.model.lin
    xt = torch.from_numpy(x).requires_grad_(True)
    (pm(xt) * torch.from_numpy(cot)).sum().backward()
    want = {"lora_a": lin.lora_A["default"].weight.grad, "lora_b": lin.lora_B["default"].weight.grad}
    if dora:
        want["magnitude"] = lin.lora_magnitude_vector["default"].weight.grad

    graphdef, params, rest = nnx.split(layer, nn.AdapterParam, ...)

    def loss(params, x):
        return jnp.vdot(nnx.merge(graphdef, params, rest)(x), cot)

    with jax.default_matmul_precision("highest"):
        g_params, dx = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    got = {path[-1]: v.get_value() for path, v in nnx.to_flat_state(g_params)}
    assert set(got) == set(want)
    for name, v in want.items():
        v = v.numpy()
        np.testing.assert_allclose(np.asarray(got[name]), v, rtol=TOL, atol=TOL * np.abs(v).max(),
                                   err_msg=name)
    np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy(), rtol=TOL,
                               atol=TOL * np.abs(xt.grad.numpy()).max())


@pytest.mark.parametrize("dora", [False, True])
def test_merge_matches_peft_merge(dora):
    pm, layer, _ = _pair(dora)
    merged = pm.merge_and_unload().lin.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(layer.merged_weight()), merged, rtol=TOL,
                               atol=TOL * np.abs(merged).max())


def test_dora_magnitude_inits_to_row_norms_and_equals_base():
    layer = nn.Linear(40, 24, rngs=nnx.Rngs(0))
    layer.adapter = DoRAConfig(r=4).build(layer, "lin", nnx.Rngs(1))
    np.testing.assert_allclose(np.asarray(layer.adapter.magnitude[...]),
                               np.linalg.norm(np.asarray(layer.weight()), axis=1), rtol=1e-6)
    x = np.ones((2, 40), np.float32)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(layer.base(x)), rtol=1e-6,
                               atol=1e-6)


def test_lora_param_count_and_bad_rank():
    layer = nn.Linear(40, 24, rngs=nnx.Rngs(0))
    layer.adapter = LoRAConfig(r=4).build(layer, "lin", nnx.Rngs(1))
    assert nn.count_params(layer) == 4 * (40 + 24)
    with pytest.raises(ValueError, match=r"LoRAConfig.r = 0, expected >= 1"):
        LoRAConfig(r=0)  # refused by the config's domain, before any layer is built
    with pytest.raises(ValueError, match=r"layer 'lin'.*r=25 exceeds min\(out, in\) = 24"):
        LoRAConfig(r=25).build(layer, "lin", nnx.Rngs(1))
