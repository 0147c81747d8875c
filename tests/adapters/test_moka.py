"""MoKA / ungated MoKA / MoKAs modules: init, parameter counts, torch and PEFT LoKr parity."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from moka_jax import nn
from moka_jax.parity import torch_ref
from moka_jax.adapters import MoKAConfig, MoKAsConfig
from moka_jax.nn import MoKADense, count_params

REPO = Path(__file__).resolve().parents[2]

TOL = 1e-5


def _randomise(layer, seed=0):
    """Give every adapter leaf random values so parity tests exercise all of them."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(layer.adapter):
        if isinstance(var, nn.AdapterParam):
            var.set_value(jnp.asarray(rng.standard_normal(var.shape).astype(np.float32)))


def _x(n, seed=1):
    return np.random.default_rng(seed).standard_normal((2, 5, n)).astype(np.float32)


@pytest.mark.parametrize("config", [
    MoKAConfig(r=4), MoKAConfig(r=3, gated=False), MoKAsConfig(r=3),
    MoKAConfig(shapes=(((5, 7), (8, 7)), ((5, 7), (8, 7)), ((4, 9), (10, 5))), scale=2.0),
])
def test_adapted_layer_equals_base_at_init(config):
    layer = MoKADense(45, 37, moka=config, rngs=nnx.Rngs(0))
    x = _x(45)
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(layer.base(x)))
    np.testing.assert_array_equal(np.asarray(layer.adapter.delta_weight()), 0)


def test_parameter_counts_equal_formulas():
    shapes = (((5, 7), (8, 7)), ((5, 7), (8, 7)), ((4, 9), (10, 5)))
    layer = MoKADense(45, 37, moka=MoKAConfig(shapes=shapes), rngs=nnx.Rngs(0))
    assert count_params(layer) == sum(ma * na + mb * nb for (ma, na), (mb, nb) in shapes) + 3
    ungated = MoKADense(45, 37, moka=MoKAConfig(shapes=shapes, gated=False), rngs=nnx.Rngs(0))
    assert count_params(ungated) == count_params(layer) - 3
    primes = (5, 7, 11)
    mokas = MoKADense(45, 37, moka=MoKAsConfig(primes=primes), rngs=nnx.Rngs(0))
    expect = sum(-(-37 // -(-45 // p)) * p for p in primes) + 3
    assert count_params(mokas) == expect


@pytest.mark.parametrize("config", [
    MoKAConfig(shapes=(((5, 7), (8, 7)), ((5, 7), (8, 7)), ((4, 9), (10, 5))), scale=0.5),
    MoKAConfig(r=3, gated=False, scale=3.0),
    MoKAsConfig(primes=(5, 7, 11), scale=2.0),
])
def test_forward_and_delta_weight_match_torch_reference(config):
    layer = MoKADense(45, 37, moka=config, rngs=nnx.Rngs(0))
    _randomise(layer)
    ref = torch_ref.from_jax(layer.adapter)
    x = _x(45)
    y_jax = np.asarray(layer(x) - layer.base(x))
    with torch.no_grad():
        y_ref = ref(torch.from_numpy(x)).numpy()
        dw_ref = ref.delta_weight().numpy()
    np.testing.assert_allclose(y_jax, y_ref, rtol=TOL, atol=TOL * np.abs(y_ref).max())
    np.testing.assert_allclose(np.asarray(layer.adapter.delta_weight()), dw_ref, rtol=TOL,
                               atol=TOL * np.abs(dw_ref).max())
    np.testing.assert_allclose(y_jax, x @ dw_ref.T, rtol=TOL, atol=TOL * np.abs(y_ref).max())


def test_single_ungated_component_equals_peft_lokr():
    from peft import LoKrConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(24, 36, bias=False)

        def forward(self, x):
            return self.lin(x)

    # r large enough that PEFT keeps w2 as one full matrix; alpha = r gives scale 1.
    peft_model = get_peft_model(Net(), LoKrConfig(target_modules=["lin"], r=64, alpha=64))
    lokr = peft_model.base_model.model.lin
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal(tuple(lokr.lokr_w1["default"].shape)).astype(np.float32)
    w2 = rng.standard_normal(tuple(lokr.lokr_w2["default"].shape)).astype(np.float32)
    with torch.no_grad():
        lokr.lokr_w1["default"].copy_(torch.from_numpy(w1))
        lokr.lokr_w2["default"].copy_(torch.from_numpy(w2))
        dw_peft = lokr.get_delta_weight("default").numpy()
        x = _x(24)
        y_peft = peft_model(torch.from_numpy(x)).numpy() - x @ lokr.base_layer.weight.numpy().T

    shapes = ((w1.shape, w2.shape),)
    layer = MoKADense(24, 36, moka=MoKAConfig(shapes=shapes, gated=False, scale=1.0),
                      rngs=nnx.Rngs(0))
    layer.adapter.a[0].set_value(jnp.asarray(w1)[None])
    layer.adapter.b[0].set_value(jnp.asarray(w2)[None])
    np.testing.assert_allclose(np.asarray(layer.adapter.delta_weight()), dw_peft, rtol=TOL,
                               atol=TOL * np.abs(dw_peft).max())
    y = np.asarray(layer(x) - layer.base(x))
    np.testing.assert_allclose(y, y_peft, rtol=TOL, atol=TOL * np.abs(y_peft).max())


def test_gate_starts_uniform_and_is_trainable():
    layer = MoKADense(45, 37, moka=MoKAConfig(r=4), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(layer.adapter.alpha()), 0.25)
    assert layer.adapter.g is not None
    ungated = MoKADense(45, 37, moka=MoKAConfig(r=4, gated=False), rngs=nnx.Rngs(0))
    assert ungated.adapter.g is None


def test_bad_input_raises_at_construction():
    with pytest.raises(ValueError, match=r"layer 'blk/q_proj'.*ma\*mb >= 37"):
        Lin = nn.Linear(45, 37, rngs=nnx.Rngs(0), name="blk/q_proj")
        MoKAConfig(shapes=(((2, 9), (3, 5)),)).build(Lin, "blk/q_proj", nnx.Rngs(0))
    with pytest.raises(ValueError, match="not prime"):
        MoKADense(45, 37, moka=MoKAsConfig(primes=(4, 7)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MoKAConfig.r = 0, expected >= 1"):
        MoKADense(45, 37, moka=MoKAConfig(r=0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="too small"):
        MoKADense(45, 37, moka=MoKAConfig(r=4, budget=10), rngs=nnx.Rngs(0))


def test_shapes_per_weight_dims():
    """shapes={"MxN": list}: each layer takes its dims' list (q_proj and a GQA v_proj differ);
    a JSON / YAML round trip keeps it; dims without an entry are named with the fix."""
    from moka_jax.adapters import adapter_config_from_dict, adapter_config_to_dict
    from moka_jax.config import load_config

    table = {"37x45": [((5, 9), (8, 5))], "12x45": [((3, 5), (4, 9)), ((2, 3), (6, 15))]}
    cfg = MoKAConfig(shapes=table, gated=False)
    q = MoKADense(45, 37, moka=cfg, rngs=nnx.Rngs(0)).adapter
    v = MoKADense(45, 12, moka=cfg, rngs=nnx.Rngs(0)).adapter
    assert list(q.shapes) == table["37x45"] and list(v.shapes) == table["12x45"] and v.r == 2
    assert adapter_config_from_dict(json.loads(json.dumps(adapter_config_to_dict(cfg)))) == cfg
    yaml_cfg = load_config(REPO / "configs" / "tiny-debug.yaml", [
        "adapter.kind=moka", "adapter.gated=false", f"adapter.shapes={json.dumps(table)}"])
    assert yaml_cfg.adapter.config.shapes == cfg.shapes and not yaml_cfg.adapter.config.gated
    with pytest.raises(ValueError, match=r"layer 'blk/o_proj'.*no entry for its 45x45 weight.*"
                                         r"add '45x45'"):
        cfg.build(nn.Linear(45, 45, rngs=nnx.Rngs(0), name="blk/o_proj"), "blk/o_proj",
                  nnx.Rngs(0))
    with pytest.raises(ValueError, match="key 'q_proj' is not a weight's dims 'MxN'"):
        MoKAConfig(shapes={"q_proj": table["37x45"]})
