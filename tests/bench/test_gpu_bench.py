"""bench/gpu_bench.py and bench/gpu_check.sh on the CPU, in their tiny mode."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moka_jax import nn, quant
from moka_jax.adapters import LoRAConfig

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench/gpu_bench.py"
_spec = importlib.util.spec_from_file_location("gpu_bench", SCRIPT)
gpu_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_bench)


def test_random_base_is_laid_out_as_load_hf_and_flops_count_it():
    c = gpu_bench.tiny_config()
    model = gpu_bench.random_nf4_base(c, jnp.bfloat16)
    q = model.layers[0].attn.q_proj.kernel.get_value()
    assert isinstance(q, quant.QuantizedWeight) and q.shape == (128, 128)
    assert model.lm_head.kernel.get_value().dtype == jnp.bfloat16  # dense, as load_hf keeps it
    assert not any(isinstance(v.get_value(), jax.ShapeDtypeStruct)
                   for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable))
    nn.attach_adapters(model, LoRAConfig(r=16), rngs=nnx.Rngs(0))
    d, f, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    base = layers * (4 * d * d + 3 * d * f) + d * c.vocab_size  # lm_head counts; embed does not
    assert gpu_bench.base_matmul_params(model) == base
    assert gpu_bench.adapter_flops_per_token(model) == layers * 2 * (2 * 16 * (d + d))
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, c.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("args, message", [
    (["--variants", "moka,nope"], "unknown variants ['nope']"),
    (["--warmup", "0"], "must be >= 1"),
    (["--token-chunk", "0"], "must be >= 1"),
])
def test_bad_input_fails_before_heavy_work(args, message, capsys, monkeypatch):
    # In this process: a child interpreter would spend seconds importing JAX to reach argparse.
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as e:
        gpu_bench.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err


def test_gpu_check_sh_tiny(tmp_path):
    # The 90 s / 360 s limits budget a GPU's 8 minutes; on 2 shared CPU cores the tiny checks
    # took 60-100 s under load (a timeout failed this test once), so CPU mode gets room.
    env = {**os.environ, "GPU_CHECK_TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "JAX_PLATFORMS": "cpu", "GPU_CHECK_CHECK_TIMEOUT": "400",
           "GPU_CHECK_BENCH_TIMEOUT": "600"}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--steps", "1", "--warmup", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["passed"] and [c["name"] for c in check["checks"]] == [
        "kron_apply", "moka_bf16", "nf4", "train_step"]
    res = json.loads((tmp_path / "gpu_bench.json").read_text())
    variants = res["variants"]
    assert list(variants) == ["moka_batched", "lora_r16", "moka_chunked"]  # both schedules
    chunked, batched, lora = variants["moka_chunked"], variants["moka_batched"], variants["lora_r16"]
    assert (chunked["schedule"], batched["schedule"], lora["schedule"]) == ("chunked", "batched", None)
    for v in (chunked, batched, lora):
        assert v["step_seconds"] > 0 and v["tokens_per_s"] > 0 and v["compilations"] == 1
        assert v["mfu"] is None and v["peak_bytes"] is None  # CPU: no peak FLOP/s, no allocator
        assert np.isfinite(v["loss"]) and v["policy_schedule"] == "chunked"
    # Same weights and batch: the two schedules give the same loss.
    assert abs(chunked["loss"] - batched["loss"]) <= 1e-2 * abs(batched["loss"])
    assert chunked["trainable_params"] == batched["trainable_params"] < lora["trainable_params"]
    assert res["schedule"] == "chunked"  # the CPU policy's pick is the one compared with LoRA
    assert res["moka_over_lora_step_time"] == chunked["step_seconds"] / lora["step_seconds"]
    assert res["moka_chunked_over_batched_step_time"] == (chunked["step_seconds"]
                                                          / batched["step_seconds"])
    assert res["moka_over_lora_peak_memory"] is None
