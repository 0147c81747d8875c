"""Peak host memory of streaming a ~1B bf16 checkpoint into nf4 with `load_hf`.

Builds a random checkpoint (`--family llama`: TinyLlama-1.1B shapes, 22 layers, d 2048, GQA
32/4, MLP 5632, vocab 32000, untied; `qwen2`: Qwen2.5-0.5B's, with q/k/v biases, tied;
`qwen3`: Qwen3-0.6B's, with q/k norms, tied) as sharded bf16 safetensors, written tensor by
tensor, in a temp dir that is deleted afterwards. Then a fresh subprocess imports jax, records
its baseline RSS, and runs `load_hf(dir, "nf4", dtype=bfloat16)`; its peak RSS is its own VmHWM
(bench/procstat.py).
Not getrusage(RUSAGE_CHILDREN): Linux carries ru_maxrss across exec, so the child's starts at
this process's high-water mark, here the checkpoint build's (it draws the 151,936-row embedding
in f32: 1.28 GB for qwen2, now `rusage_children_maxrss_bytes`; the 1.298 first reported for
qwen2 on 2026-12-07 was this figure, not the load's).
Embeddings, norms and lm_head stay bf16 (as load_hf keeps them), every other linear is nf4.

    python bench/convert_memory.py [--family llama] [--layers N] [--tmp /tmp] [--keep]

Last stdout line: one JSON object. Two bounds:
  * `peak_rss_over_bf16_checkpoint` <= 0.6, the original one. It cannot hold for a tied,
    embedding-heavy model: the bf16 embedding stays resident, so the finished model alone
    plus the ~0.19 GB jax baseline (`floor_over_bf16_checkpoint`) already exceeds 0.6 for
    Qwen2.5-0.5B (0.196 + 0.474 GB = 0.678 x 0.988 GB; the embedding is 27.6% of its
    parameters and 0.272 GB) and Qwen3-0.6B (0.633), before any transient.
  * `peak_rss_over_structural_bound` <= 1, the streaming invariant, the same for every
    family: peak <= baseline + finished model + the two largest checkpoint tensors
    (tests/models/test_hf.py checks, per family, that the loader holds at most two at once).

Measured 2026-11-28 (2 CPU cores, shared; jax 0.10.2 CPU): llama 0.509 (peak 1.12 GB).
2026-12-07 (2 cores shared with a niced job: memory, not time), peak = the load's own VmHWM,
before -> after the loader fix (before: the library at 25562b7, measured by this script):
    llama  2.20 GB ckpt, nf4 0.81 GB: 1.131 -> 1.112 GB = 0.514 -> 0.505 (structural 0.894 -> 0.879)
    qwen2  0.99 GB ckpt, nf4 0.47 GB: 1.046 -> 0.752 GB = 1.058 -> 0.761 (structural 1.100 -> 0.791)
    qwen3  1.19 GB ckpt, nf4 0.56 GB: 1.165 -> 0.847 GB = 0.977 -> 0.710 (structural 1.086 -> 0.790)
The qwen transient was jnp.asarray placing the host embedding: on jax's CPU client it holds
two more copies at its peak (+546 MB for the 272 MB qwen2 embedding), made asynchronously and
surfacing during a later norm's placement. load_hf now reads into 64-byte-aligned buffers that
jax.device_put aliases without a copy (moka_jax/support/hostmem.py); after it, the peak is the
finished model's RSS (baseline + model + ~0.06-0.11 GB of XLA code pages and allocator slack).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 500 * 2**20


def tinyllama_config(layers: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
            "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": layers,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 64,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16"}


def qwen2_5_0_5b_config(layers: int) -> dict:
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
            "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": layers,
            "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
            "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
            "use_sliding_window": False, "tie_word_embeddings": True, "dtype": "bfloat16"}


def qwen3_0_6b_config(layers: int) -> dict:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936,
            "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": layers,
            "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 40960,
            "rope_theta": 1000000.0, "use_sliding_window": False, "tie_word_embeddings": True,
            "dtype": "bfloat16"}


# family -> (config.json for a layer count, the architecture's own layer count)
FAMILIES = {"llama": (tinyllama_config, 22), "qwen2": (qwen2_5_0_5b_config, 24),
            "qwen3": (qwen3_0_6b_config, 28)}


def build_checkpoint(out: Path, config: dict) -> tuple[int, int, list[int]]:
    """Sharded bf16 safetensors + index; one tensor in memory at a time.
    Returns (bytes, params, each tensor's bytes)."""
    from moka_jax.models.hf import hf_tensor_specs, write_safetensors
    from moka_jax.models.llama import LlamaConfig

    specs = hf_tensor_specs(LlamaConfig.from_hf_dict(config))
    need, free = sum(int(np.prod(s.shape)) * 2 for s in specs), shutil.disk_usage(out).free
    if need > 0.9 * free:
        raise RuntimeError(f"{out}: the checkpoint needs {need / 2**30:.1f} GiB, "
                           f"{free / 2**30:.1f} GiB free")
    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)

    def make(shape, is_norm):
        if is_norm:
            return np.ones(shape, bf16)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(bf16)

    shards, size = [[]], 0
    for s in specs:
        nbytes = int(np.prod(s.shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    weight_map, bar = {}, tqdm(total=len(specs), desc="write bf16 checkpoint", unit="tensor",
                               file=sys.stderr)
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"

        def getter(s):
            def get():
                bar.update()
                return make(s.shape, "norm" in s.hf_name)
            return get

        write_safetensors(out / name, [(s.hf_name, s.shape, bf16, getter(s)) for s in shard])
        weight_map.update({s.hf_name: name for s in shard})
    bar.close()
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(config))
    return (total, sum(int(np.prod(s.shape)) for s in specs),
            [int(np.prod(s.shape)) * 2 for s in specs])


def child(path: str) -> None:
    """Runs in the fresh subprocess: baseline RSS after imports, then the streaming nf4 load."""
    import psutil

    from procstat import peak_rss_bytes

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moka_jax.models.hf import load_hf

    jax.devices()  # the CPU client is part of the baseline
    baseline = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    model, _ = load_hf(path, "nf4", dtype=jnp.bfloat16, progress=True)
    jax.block_until_ready(nnx.state(model))
    seconds = time.perf_counter() - t0
    nbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    print(json.dumps({"baseline_rss_bytes": baseline, "nf4_model_bytes": nbytes,
                      "conversion_seconds": round(seconds, 1),
                      "rss_after_load_bytes": psutil.Process().memory_info().rss,
                      "peak_rss_bytes": peak_rss_bytes()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=sorted(FAMILIES), default="llama")
    ap.add_argument("--layers", type=int, help="default: the architecture's own (22, 24, 28)")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (prints its path)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    make_config, layers = FAMILIES[args.family]
    config = make_config(args.layers or layers)
    work = Path(tempfile.mkdtemp(prefix="moka_convert_bench_", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        ckpt_bytes, params, tensor_bytes = build_checkpoint(work, config)
        build_seconds = time.perf_counter() - t0
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
                   PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        proc = subprocess.run([sys.executable, __file__, "--child", str(work)], env=env,
                              stdout=subprocess.PIPE, text=True, check=True)
        child_out = json.loads(proc.stdout.strip().splitlines()[-1])
        # not the peak: a child's ru_maxrss starts at this process's own high-water mark (Linux
        # carries it across exec), here the checkpoint build's; kept to show the difference
        rusage_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    finally:
        if args.keep:
            print(f"checkpoint kept at {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    base, peak, model = (child_out[k] for k in ("baseline_rss_bytes", "peak_rss_bytes",
                                                  "nf4_model_bytes"))
    # The streaming invariant, the same for every family: the jax baseline, the finished model
    # and at most two checkpoint tensors in flight (tests/models/test_hf.py checks the last).
    two_largest = sum(sorted(tensor_bytes)[-2:])
    structural = base + model + two_largest
    print(json.dumps({
        "checkpoint_params": params, "checkpoint_bytes": ckpt_bytes,
        "nf4_model_bytes": model, "peak_rss_bytes": peak,
        "baseline_rss_bytes": base,
        "peak_rss_over_bf16_checkpoint": round(peak / ckpt_bytes, 3),
        "peak_rss_minus_baseline_over_bf16_checkpoint": round((peak - base) / ckpt_bytes, 3),
        "floor_over_bf16_checkpoint": round((base + model) / ckpt_bytes, 3),
        "two_largest_tensor_bytes": two_largest,
        "structural_bound_bytes": structural,
        "peak_rss_over_structural_bound": round(peak / structural, 3),
        "rusage_children_maxrss_bytes": rusage_children,
        "rss_after_load_bytes": child_out["rss_after_load_bytes"],
        "conversion_seconds": child_out["conversion_seconds"],
        "build_seconds": round(build_seconds, 1),
        "config": {k: config[k] for k in ("architectures", "num_hidden_layers", "hidden_size", "intermediate_size",
                                          "num_attention_heads", "num_key_value_heads",
                                          "vocab_size")},
        "float_dtype": "bfloat16", "quant": "nf4", "block_size": 64,
    }))


if __name__ == "__main__":
    main()
