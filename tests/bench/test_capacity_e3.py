"""bench/capacity_e3.py on small dims: the synthetic path, the controls, the adapter reader."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("capacity_e3", REPO / "bench" / "capacity_e3.py")
capacity_e3 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(capacity_e3)

SMALL = ["--synthetic", "--layers", "2", "--dims", "24x24", "8x24", "--ranks", "1", "2", "4",
         "--steps", "30"]


def test_synthetic_run_prints_the_e3_json_and_writes_the_plot(tmp_path, capsys):
    png = tmp_path / "e3.png"
    capacity_e3.main([*SMALL, "--plot", str(png), "--by-shape"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert png.is_file() and png.stat().st_size > 1000
    assert out["matrices"] == 4 and out["dims"] == {"q_proj": [24, 24], "v_proj": [8, 24]}
    assert set(out["controls"]) == {"gaussian", "lowrank"}
    for res in [out["e3"], *out["controls"].values()]:
        for p in capacity_e3.PARAMETERISATIONS:
            assert set(res[p]) == {"1", "2", "4"}
            for r in ("1", "2", "4"):
                e = res[p][r]
                assert 0 <= e["rel_error"][0] <= 1 and e["rel_error"][1] >= 0
                assert e["eff_rank"][0] >= 1
            # More budget, lower error; LoRA's params are exactly 2 layers x r (m + n).
            errs = [res[p][r]["rel_error"][0] for r in ("1", "2", "4")]
            assert errs == sorted(errs, reverse=True)
        for r in ("1", "2", "4"):
            assert res["lora"][r]["params"] == 2 * int(r) * (48 + 32)
            # MoKA within its budget; refinement never loses to its start; one product = start
            assert res["moka"][r]["params"] <= res["lora"][r]["params"]
            assert res["moka"][r]["rel_error"][0] <= res["kron_greedy"][r]["rel_error"][0] + 1e-6
        assert res["moka"]["1"] == res["kron_greedy"]["1"]
        assert res["lora"]["1"]["eff_rank"] == [1.0, 0.0]
    # The rank-8 control is fitted exactly by LoRA at rank >= 8 only; at 4 it is not.
    assert out["controls"]["lowrank"]["lora"]["4"]["rel_error"][0] > 0.05
    by_shape = out["e3"]["kron1_by_shape"]["q_proj"]
    first = str(capacity_e3.budget_shapes(24, 24, 1)[0])
    np.testing.assert_allclose(by_shape[first]["rel_error"],
                               out["e3"]["kron_greedy"]["1"]["by_weight"]["q_proj"]["rel_error"],
                               rtol=1e-9, atol=1e-12)


def test_controls_keep_shapes_and_norms():
    targets = capacity_e3.synthetic_targets(3, {"q_proj": (12, 12), "v_proj": (4, 12)})
    for kind in ("gaussian", "lowrank"):
        ctl = capacity_e3.control_targets(targets, kind)
        for name in targets:
            for w, c in zip(targets[name], ctl[name]):
                assert c.shape == w.shape
                assert np.isclose(np.linalg.norm(c), np.linalg.norm(w))
                rank = np.linalg.matrix_rank(c)
                assert rank == (min(c.shape) if kind == "gaussian" else min(8, *c.shape))


def test_lora_fit_is_exact_at_the_target_rank_and_matches_numpy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 3)) @ rng.normal(size=(3, 12))
    f = capacity_e3.fit_matrix(w, [1, 3], steps=0, lr=1e-3)
    assert f["lora"][3][0] < 1e-12
    s = np.linalg.svd(w, compute_uv=False)
    assert np.isclose(f["lora"][1][0], np.sqrt(np.sum(s[1:] ** 2)) / np.linalg.norm(w))


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    """A LoRA and a MoKA adapter on the tiny random model, with non-zero factors."""
    import jax
    from flax import nnx

    import moka_jax
    from moka_jax.nn import linear_paths

    dirs = {}
    for kind, cfg in [("lora", moka_jax.LoRAConfig(r=2, alpha=4.0)),
                      ("moka", moka_jax.MoKAConfig(r=2))]:
        model, _ = moka_jax.load("random", quant="none")
        moka_jax.attach_adapters(model, cfg, rngs=nnx.Rngs(0))
        key = jax.random.key(1)
        for _, layer in linear_paths(model):
            if layer.adapter is not None:
                for var in jax.tree.leaves(nnx.state(layer.adapter, moka_jax.AdapterParam),
                                           is_leaf=lambda x: isinstance(x, nnx.Variable)):
                    key, sub = jax.random.split(key)
                    var.set_value(jax.random.normal(sub, var.get_value().shape))
        want = {}
        for path, layer in linear_paths(model):
            if layer.adapter is not None:
                want[path] = np.asarray(layer.merged_weight() - layer.weight())
        d = moka_jax.save_adapter(model, tmp_path_factory.mktemp(kind) / "adapter")
        dirs[kind] = (d, want)
    return dirs


@pytest.mark.parametrize("kind", ["lora", "moka"])
def test_read_targets_gives_each_layers_update(tiny_adapters, kind):
    d, want = tiny_adapters[kind]
    got = capacity_e3.read_targets(d, model="random")
    assert set(got) == {"q_proj", "v_proj"}
    for name, mats in got.items():
        paths = sorted((p for p in want if p.endswith(name)),
                       key=lambda p: int(p.split("/")[1]))
        assert len(mats) == len(paths) > 0
        for w, p in zip(mats, paths):
            np.testing.assert_allclose(w, want[p], rtol=1e-4, atol=1e-5)
