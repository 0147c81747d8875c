"""The frozen Linear, attaching adapters by regex, and the optimizer seeing only AdapterParam."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moka_jax import nn
from moka_jax.adapters import LoRAConfig, MoKAConfig, MoKAsConfig
from moka_jax.variables import AdapterParam, FrozenWeight


class Block(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nn.Linear(32, 32, rngs=rngs)
        self.k_proj = nn.Linear(32, 16, rngs=rngs)
        self.v_proj = nn.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.q_proj(x).sum(-1) + self.k_proj(x).sum(-1) + self.v_proj(x).sum(-1)


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Block(rngs), Block(rngs)])

    def __call__(self, x):
        return sum(layer(x) for layer in self.layers)


def test_attach_by_default_regex_and_no_match_error():
    model = Tiny(nnx.Rngs(0))
    paths = nn.attach_adapters(model, MoKAConfig(r=2), rngs=nnx.Rngs(1))
    assert paths == ["layers/0/q_proj", "layers/0/v_proj", "layers/1/q_proj", "layers/1/v_proj"]
    assert model.layers[0].k_proj.adapter is None
    with pytest.raises(ValueError, match=r"'o_proj\$' matches no Linear layer.*layers/0/q_proj"):
        nn.attach_adapters(model, MoKAConfig(r=2), "o_proj$", rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="invalid"):
        nn.attach_adapters(model, MoKAConfig(r=2), "(", rngs=nnx.Rngs(1))


@pytest.mark.parametrize("config", [MoKAConfig(r=3), MoKAsConfig(r=2), LoRAConfig(r=2)])
def test_adamw_step_touches_adapters_only(config):
    model = Tiny(nnx.Rngs(0))
    nn.attach_adapters(model, config, rngs=nnx.Rngs(1))
    frozen_before = jax.tree.map(np.array, nnx.state(model, FrozenWeight))
    adapter_before = jax.tree.map(np.array, nnx.state(model, AdapterParam))
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=AdapterParam)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)), jnp.float32)

    @nnx.jit
    def step(model, opt, x):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - 1.0) ** 2),
                                         argnums=nnx.DiffState(0, AdapterParam))(model)
        opt.update(model, grads)
        return loss

    for _ in range(3):
        step(model, opt, x)
    frozen_after = nnx.state(model, FrozenWeight)
    for u, v in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
        np.testing.assert_array_equal(u, np.asarray(v))  # bit-identical base
    changed = [not np.array_equal(u, np.asarray(v)) for u, v in
               zip(jax.tree.leaves(adapter_before), jax.tree.leaves(nnx.state(model, AdapterParam)))]
    assert all(changed)
    opt_leaves = jax.tree.leaves(nnx.state(opt))
    n_adapter = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nn.adapter_state(model)))
    # AdamW keeps mu and nu for exactly the adapter tree (+ a step counter).
    assert sum(int(np.prod(v.shape)) for v in opt_leaves if v.ndim > 0) == 2 * n_adapter


def test_linear_bad_weight_shape():
    with pytest.raises(ValueError, match=r"layer 'x'.*\(3, 4\) != \(out, in\) = \(4, 3\)"):
        nn.Linear(3, 4, weight=np.zeros((3, 4), np.float32), name="x")


# ---- PEFT-style target lists --------------------------------------------------------------


def test_target_list_matches_last_component_like_peft():
    model = Tiny(nnx.Rngs(0))
    paths = nn.attach_adapters(model, LoRAConfig(r=2), ["q_proj", "v_proj"], rngs=nnx.Rngs(1))
    assert paths == ["layers/0/q_proj", "layers/0/v_proj", "layers/1/q_proj", "layers/1/v_proj"]
    assert model.moka_adapters == ((LoRAConfig(r=2), ("q_proj", "v_proj")),)
    other = Tiny(nnx.Rngs(0))  # "1/k_proj": trailing components
    assert nn.attach_adapters(other, LoRAConfig(r=2), ["1/k_proj"], rngs=nnx.Rngs(1)) == \
        ["layers/1/k_proj"]


@pytest.mark.parametrize("targets, message", [
    (["o_proj"], r"targets \['o_proj'\] matches no Linear layer.*module names are "
                 r"\['k_proj', 'q_proj', 'v_proj'\]"),
    (["self_attn.q_proj"], r"write \['q_proj'\]"),
    ([], "non-empty list of module names"),
    ("o_proj$", r"module names are \['k_proj', 'q_proj', 'v_proj'\]"),
])
def test_bad_targets_name_the_module_names(targets, message):
    with pytest.raises(ValueError, match=message):
        nn.attach_adapters(Tiny(nnx.Rngs(0)), LoRAConfig(r=2), targets, rngs=nnx.Rngs(1))


# ---- plain flax.nnx.Linear models ---------------------------------------------------------


class PlainMLP(nnx.Module):
    """An NNX model that knows nothing of moka_jax."""

    def __init__(self, rngs):
        self.blocks = nnx.List([nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)])
        self.head = nnx.Linear(16, 4, use_bias=False, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, x):
        for b in self.blocks:
            x = jax.nn.gelu(b(x))
        return self.head(self.norm(x))


@pytest.mark.parametrize("config", [MoKAConfig(r=2), LoRAConfig(r=2)])
def test_plain_nnx_linear_is_frozen_and_adapted(config):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 16)), jnp.float32)
    model = PlainMLP(nnx.Rngs(0))
    y_base = np.asarray(model(x))
    paths = nn.attach_adapters(model, config, ["blocks/0", "blocks/1", "head"], rngs=nnx.Rngs(2))
    assert paths == ["blocks/0", "blocks/1", "head"]
    np.testing.assert_array_equal(np.asarray(model(x)), y_base)  # dW = 0 at init, same matmul
    params = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert not {p for p in params if not p.startswith("norm/") and "/adapter/" not in p}
    # What an nnx.LoRAParam trainer (tunix) trains is exactly the adapter tree.
    lora = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert len(lora) == len(jax.tree.leaves(nn.adapter_state(model))) > 0

    frozen_before = jax.tree.map(np.array, nnx.state(model, FrozenWeight))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, x):
        def loss_fn(m):
            return jnp.mean((m(x) - 1.0) ** 2)
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return grads

    grads = step(model, opt, x)
    flat = {"/".join(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(grads)}
    assert set(flat) == {"/".join(map(str, p)) for p, _ in
                         nnx.to_flat_state(nn.adapter_state(model))}
    # B starts at zero, so its gradient is non-zero (MoKA's A gets none until B moves).
    assert all(np.abs(v).max() > 0 for k, v in flat.items() if k.endswith(("/b/0", "lora_b")))
    for u, v in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(nnx.state(model, FrozenWeight))):
        np.testing.assert_array_equal(u, np.asarray(v))  # the base is bit-identical
    assert np.abs(np.asarray(model(x)) - y_base).max() > 0  # the adapter moved
