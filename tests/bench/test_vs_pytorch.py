"""bench/vs_pytorch.py end to end on its tiny random LLaMA: every variant, one shared batch."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

for _pkg in ("torch", "transformers", "peft", "bitsandbytes"):
    pytest.importorskip(_pkg)

SCRIPT = Path(__file__).resolve().parents[2] / "bench/vs_pytorch.py"
_spec = importlib.util.spec_from_file_location("vs_pytorch", SCRIPT)
vs_pytorch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_pytorch)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["--variants", "jax_moka_nf4,nope"], "unknown variant(s) nope; choose from jax_moka_nf4"),
    (["--warmup", "0"], "--warmup must be >= 1"),
    (["--attention-block", "0"], "--attention-block must be >= 1"),
    (["--model-dir", "/nonexistent"], "no config.json there"),
])
def test_bad_input_fails_before_heavy_work(args, message, capsys):
    # In this process: the parent's argument checks need no interpreter of their own.
    with pytest.raises(SystemExit) as e:
        vs_pytorch.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err


def test_tiny_runs_every_variant_and_one_epoch():
    # one attention block per 768-token row: the default's 12 unrolled blocks per layer only
    # lengthen the JAX compiles (tests/models/test_llama.py checks blocked attention)
    r = run("--tiny", "--batch", "1", "--steps", "1", "--warmup", "1", "--epoch-examples", "6",
            "--pack-rows", "2", "--attention-block", "768")
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    v = res["fixed_batch"]["variants"]
    assert list(v) == list(vs_pytorch.VARIANTS) and res["errors"] == []
    for name, x in v.items():
        assert x["step_seconds"] > 0 and x["tokens_per_s"] > 0 and x["peak_rss_bytes"] > 0, name
        assert len(x["losses"]) == 2 and all(map(math.isfinite, x["losses"])), name
    assert v["jax_moka_nf4"]["compile_seconds"] >= 0
    assert res["jax_attention_block"] == 768
    # Same batch, same base weights, every adapter starts at dW = 0: the first loss is the base
    # model's, equal across frameworks (nf4: JAX's codes are bitsandbytes'), and nf4 != f32.
    first = {n: x["losses"][0] for n, x in v.items()}
    f32 = [first[n] for n in ("torch_moka_f32", "jax_lora_f32", "torch_lora_f32")]
    assert max(f32) - min(f32) <= 1e-5 * f32[0], first
    assert abs(first["jax_moka_nf4"] - first["torch_qlora_nf4"]) <= 1e-5 * f32[0], first
    assert abs(first["jax_moka_nf4"] - f32[0]) > 1e-5 * f32[0], first
    params = {n: x["trainable_params"] for n, x in v.items()}
    assert params["jax_moka_nf4"] == params["torch_moka_f32"], params
    assert params["jax_lora_f32"] == params["torch_lora_f32"] == params["torch_qlora_nf4"], params
    assert 0.2 <= res["moka_params_over_lora_r16"] <= 0.3
    for name in vs_pytorch.TARGETS:
        if name in vs_pytorch.RATIOS or name in vs_pytorch.EPOCH_RATIOS:
            assert res[name] > 0
    assert res["machine"]["jax_backend"] == "cpu" and res["machine"]["torch_threads"] >= 1
    assert res["machine"]["cpu_model"] and set(res["kernels"]) == {"jax", "torch"}
    # One epoch: both frameworks see the same examples (the same real tokens), each with its
    # own batching; JAX's packed path compiles once.
    e = res["epoch"]["variants"]
    jx, pt = e["jax_moka_nf4"], e["torch_qlora_nf4"]
    assert jx["examples"] == pt["examples"] == 6 and jx["real_tokens"] == pt["real_tokens"]
    assert pt["steps"] == 6 and jx["rows_per_step"] == 2 and jx["compilations"] == 1
    assert math.isfinite(jx["mean_loss"]) and math.isfinite(pt["mean_loss"])
    assert res["jax_moka_over_torch_qlora_epoch_time"] > 0
