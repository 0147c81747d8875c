"""The PyTorch side-by-side on the tiny config: same losses step by step, same trained dW."""

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from moka_jax.cli import compare as compare_cli  # noqa: E402
from moka_jax.parity import compare  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs/tiny-debug.yaml"
# One 384-token bucket and a small batch keep this to one compile and a few seconds a step;
# lr 1e-2 (10x the config's) makes any optimizer mismatch show within the steps run.
FAST = ["train.batch_size=4", "data.cutoff_len=384", "data.buckets=[384]", "train.lr=1e-2",
        "data.train.0.limit=48", "data.train.1.limit=48"]


def test_jax_and_torch_train_identically(capsys):
    argv = ["--config", str(CONFIG), "--steps", "6"]
    for s in FAST:
        argv += ["--set", s]
    assert compare_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "forcing model.quant=none and model.dtype=float32" in out
    r = json.loads(out.strip().splitlines()[-1])
    assert r["steps"] == 6 and r["forced"] == {"model.quant": "none", "model.dtype": "float32"}
    assert r["max_rel_diff"] <= 1e-4, out
    # The adapters moved (dW starts at 0) and moved the same way on both sides.
    assert r["dw_norm"] > 1e-2 and r["dw_rel_diff"] <= 1e-4, out
    assert r["jax_compile_steps"] == 1 and r["time_ratio_torch_over_jax"] > 0


def test_forced_settings_override_the_config():
    cfg = compare.forced_config(CONFIG, ["model.quant=nf4", "model.dtype=bfloat16"], steps=5)
    assert (cfg.model.quant, cfg.model.dtype, cfg.train.steps) == ("none", "float32", 5)
