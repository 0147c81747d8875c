"""Train-step speed and memory on one GPU: LLaMA-2-7B shapes (random weights), nf4 base, seq 512.

Variants, each the real jitted TrainStep (loss, grads of the trainable tree, AdamW update), in
a fresh process of its own so that the device's peak memory is that variant's alone:
  - moka_batched / moka_chunked: MoKA on q_proj, v_proj, the paper's 7B setting (r=10, planner
    shapes, ~80k per layer), with each schedule of the factored apply (core/schedules.py);
    moka: the schedule the policy picks on this backend (kron.resolve_schedule);
  - lora_r16: LoRA r=16, alpha 32 on q_proj, v_proj;
  - frozen (opt-in): no adapter, a zero probe on the embeddings gives a full-depth backward.
The base (models.random_base) is laid out as `load_hf` lays out a real checkpoint: q/k/v/o and MLP in nf4, embeddings,
norms and lm_head dense in --dtype. Each 4-bit weight is drawn and quantised in one jitted call
on the device: the host quantiser would pull all 6.5B weights through numpy, over a minute per
variant (12 ns a weight on the project's CPU machine).

Per variant: median step seconds after --warmup steps (the first one compiles), tokens/s, MFU,
peak device memory (memory_stats()['peak_bytes_in_use'] over the child's life, init included;
null where the backend has none),
trainable params. MFU counts 4 x base matmul params x tokens (forward + activation backward
of the frozen base; embedding lookups and attention scores not counted) plus 3 x the
adapters' forward flops (forward, activation and weight gradients), over the device's
datasheet dense bf16 peak (null on CPU or an unknown device). Last stdout line: one JSON object.

    python bench/gpu_bench.py [--batch 8] [--seq 512] [--steps 10] [--variants moka,lora_r16]
    (default variants: moka_batched,lora_r16,moka_chunked; the JSON's moka_over_lora_* use the
    schedule the policy picks, moka_chunked_over_batched_step_time compares the two)
    python bench/gpu_bench.py --tiny      # 2-layer model: the CPU smoke test
    python bench/gpu_bench.py --check     # correctness on the default device (GPU or CPU)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import flax
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import moka_jax as mj
from moka_jax import nn, quant
from moka_jax.adapters import LoRA, MoKA
from moka_jax.core import kron
from moka_jax.core import schedules as kron_schedule
from moka_jax.models import presets
from moka_jax.models.random_base import random_nf4_base
from moka_jax.quant.nf4 import quantize_nf4_on_device
from moka_jax.training.step import TrainStep, one_example_rows, split_model

VARIANTS = ("moka", "moka_batched", "moka_chunked", "lora_r16", "frozen")
# The chunked schedule last: on a GPU it is the slow one, so a timeout loses only it.
DEFAULT_VARIANTS = "moka_batched,lora_r16,moka_chunked"
# Datasheet dense bf16 FLOP/s by a substring of jax's device_kind, most specific first.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12))


def tiny_config():
    """The --tiny smoke model: presets.tiny, a little wider, with a 512-token vocabulary."""
    return presets.tiny(vocab=512, hidden=128, intermediate=256, heads=4, kv_heads=4,
                        tie_embeddings=False)


def moka_schedule(variant: str) -> str:
    """The adapter.schedule of a moka* variant: moka -> auto, moka_<schedule> -> <schedule>."""
    return variant.partition("_")[2] or "auto"


def attach(model, variant: str, moka_r: int):
    if variant.startswith("moka"):
        nn.attach_adapters(model, mj.MoKAConfig(r=moka_r, schedule=moka_schedule(variant)),
                           rngs=nnx.Rngs(1))
    elif variant == "lora_r16":
        nn.attach_adapters(model, mj.LoRAConfig(r=16, alpha=32), rngs=nnx.Rngs(1))
    elif variant == "frozen":
        from train_step import ProbedEmbed  # bench/ is on sys.path when run as a script
        model.embed = ProbedEmbed(model.embed, model.config.hidden_size)
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


# ---- flops ------------------------------------------------------------------------------------

def base_matmul_params(model) -> int:
    return sum(layer.in_features * layer.out_features for _, layer in nn.linear_paths(model))


def adapter_flops_per_token(model) -> int:
    """Forward flops per token of all adapters: MoKA the cheaper contraction order of each
    component (as kron.kron_mixture_apply runs it), LoRA 2 r (in + out)."""
    total = 0
    for path, layer in nn.linear_paths(model):
        a = layer.adapter
        if isinstance(a, MoKA):
            total += sum(min(kron.kron_flops(*s)) for s in a.shapes)
        elif isinstance(a, LoRA):
            total += 2 * a.r * (a.m + a.n)
        elif a is not None:
            raise TypeError(f"{path}: no flop count for {type(a).__name__}")
    return total


def peak_flops(device_kind: str) -> float | None:
    return next((f for name, f in PEAK_BF16 if name in device_kind), None)


def memory_stat(device, key: str) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        return None
    return None if not stats or key not in stats else int(stats[key])


# ---- one variant (run in a child process) -----------------------------------------------------

def run_variant(args, variant: str) -> dict:
    if args.token_chunk:
        kron_schedule.TOKEN_CHUNK = args.token_chunk  # read when the step is traced
    config = tiny_config() if args.tiny else presets.llama2_7b()
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    t0 = time.perf_counter()
    model = random_nf4_base(config, dtype, block_size=args.block_size, remat=args.remat)
    attach(model, variant, args.moka_r)
    jax.block_until_ready(nnx.state(model))
    model_bytes = memory_stat(device, "bytes_in_use")
    init_seconds = time.perf_counter() - t0
    trainable = nn.count_params(model)
    flops_per_token = 4 * base_matmul_params(model) + 3 * adapter_flops_per_token(model)
    graphdef, params, frozen = split_model(model)
    del model
    tx = optax.adamw(2e-4)
    opt_state = tx.init(params)
    step = TrainStep(graphdef, tx)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, args.batch, args.seq),
                                            dtype=np.int32)
    batch = one_example_rows(jnp.asarray(ids))  # every position scored, as before packing
    times = []
    for _ in tqdm(range(args.warmup + args.steps), desc=variant, leave=False):
        t = time.perf_counter()
        params, opt_state, metrics = jax.block_until_ready(
            step(params, opt_state, frozen, batch))
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[args.warmup:])
    tokens = args.batch * args.seq
    peak = peak_flops(device.device_kind)
    return {
        "trainable_params": trainable, "step_seconds": step_s,
        "step_seconds_min_max": [min(times[args.warmup:]), max(times[args.warmup:])],
        "tokens_per_s": tokens / step_s,
        "compile_seconds": times[0] - step_s,  # first step minus a steady one
        "init_seconds": init_seconds, "flops_per_step": flops_per_token * tokens,
        "mfu": None if peak is None else flops_per_token * tokens / step_s / peak,
        "peak_bytes": memory_stat(device, "peak_bytes_in_use"), "model_bytes": model_bytes,
        "loss": float(metrics["loss"]), "compilations": step.compilations,
        "schedule": (kron.resolve_schedule(moka_schedule(variant))
                     if variant.startswith("moka") else None),
        "policy_schedule": kron.resolve_schedule(),  # what "auto" picks on this backend
        "device_kind": device.device_kind, "peak_flops": peak,
        "versions": {m.__name__: m.__version__ for m in (jax, flax, optax)},
    }


def run_children(args, argv: list[str]) -> dict:
    """Each variant in a fresh interpreter: the allocator's peak is per process."""
    res = {"bench": "gpu_bench",
           "model": ("tiny 2-layer LLaMA" if args.tiny else "LLaMA-2-7B shapes")
           + ", random weights, nf4 base (q/k/v/o, MLP), dense embeddings / norms / lm_head",
           "batch": [args.batch, args.seq], "dtype": args.dtype, "remat": args.remat,
           "moka_r": args.moka_r, "token_chunk": args.token_chunk or kron_schedule.TOKEN_CHUNK,
           "adapted": "q_proj, v_proj", "variants": {}}
    t0 = time.perf_counter()
    for variant in args.variants:
        proc = subprocess.run([sys.executable, __file__, *argv, "--only", variant],
                              stdout=subprocess.PIPE, text=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode or not lines:
            out = {"error": f"exit code {proc.returncode} (see the log above)"}
        else:
            out = json.loads(lines[-1])
        res["variants"][variant] = out
        print(f"{variant}: {json.dumps(out)}", flush=True)
    v = {k: x for k, x in res["variants"].items() if "error" not in x}
    res["device_kind"] = next((x["device_kind"] for x in v.values()), None)
    # The device is the children's alone, so the policy's pick comes from what they report.
    mokas = {x["schedule"]: x for k, x in v.items() if k.startswith("moka")}
    picked = mokas.get(next((x["policy_schedule"] for x in v.values()), None))
    res["schedule"] = picked["schedule"] if picked else None
    if "chunked" in mokas and "batched" in mokas:
        res["moka_chunked_over_batched_step_time"] = (mokas["chunked"]["step_seconds"]
                                                      / mokas["batched"]["step_seconds"])
    if picked and "lora_r16" in v:
        moka, lora = picked, v["lora_r16"]
        res["moka_over_lora_step_time"] = moka["step_seconds"] / lora["step_seconds"]
        res["moka_over_lora_params"] = moka["trainable_params"] / lora["trainable_params"]
        res["moka_over_lora_peak_memory"] = (
            moka["peak_bytes"] / lora["peak_bytes"] if moka["peak_bytes"] and lora["peak_bytes"]
            else None)
    res["total_seconds"] = time.perf_counter() - t0
    return res


def print_table(res: dict):
    print(f"{'variant':<13} {'step s':>8} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} "
          f"{'compile s':>9} {'params':>10}")
    for name, x in res["variants"].items():
        if "error" in x:
            print(f"{name:<13} {x['error']}")
            continue
        mfu = "-" if x["mfu"] is None else f"{x['mfu']:.3f}"
        peak = "-" if x["peak_bytes"] is None else f"{x['peak_bytes'] / 2**30:.2f}"
        print(f"{name:<13} {x['step_seconds']:>8.4f} {x['tokens_per_s']:>9.0f} {mfu:>6} "
              f"{peak:>9} {x['compile_seconds']:>9.1f} {x['trainable_params']:>10,}")


# ---- correctness checks (--check) -----------------------------------------------------------

def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_kron(rng) -> dict:
    """kron_apply on both schedules, values and gradients, against numpy / the materialised
    product (f32, highest precision)."""
    a = rng.standard_normal((8, 16)).astype(np.float32)
    b = rng.standard_normal((15, 7)).astype(np.float32)
    m, n = 117, 100  # padded on both sides; 3 rows x 40 tokens take the chunked loop
    x = rng.standard_normal((3, 40, n)).astype(np.float32)
    cot = rng.standard_normal((3, 40, m)).astype(np.float32)
    ref = x.astype(np.float64) @ np.kron(a, b)[:m, :n].T.astype(np.float64)

    def loss(fn):
        return jax.jit(jax.grad(lambda x, a, b: jnp.vdot(fn(x, a, b), cot), argnums=(0, 1, 2)))

    errs = {}
    with jax.default_matmul_precision("highest"):
        want = loss(lambda x, a, b: x @ kron.kron_materialize(a, b, m, n).T)(x, a, b)
        for schedule in ("chunked", "batched"):
            apply = partial(kron.kron_apply, m=m, n=n, schedule=schedule)
            errs[f"{schedule}_forward"] = _rel(apply(jnp.asarray(x), a, b), ref)
            got = loss(apply)(x, a, b)
            errs.update({f"{schedule}_grad_{k}": _rel(g, w) for k, g, w in zip("xab", got, want)})
    return {"name": "kron_apply", "passed": max(errs.values()) < 1e-4, "rel_err": errs}


def check_moka_bf16(rng) -> dict:
    """A 576x576 MoKA (planner r=10) in bf16 on the device, both schedules: its delta's error
    against float64 at most 1.5x that of a dense bf16 matmul by the same dW (f32 accumulation)."""
    base = nn.Linear(576, 576, rngs=nnx.Rngs(0))
    moka = mj.MoKAConfig(r=10).build(base, "moka", nnx.Rngs(1))
    for b in moka.b:  # B = 0 at init
        b.set_value(jnp.asarray(0.05 * rng.standard_normal(b.shape), jnp.float32))
    x = jnp.asarray(rng.standard_normal((256, 576)), jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        dw = np.asarray(moka.delta_weight(), np.float64)
    ref = np.asarray(x, np.float64) @ dw.T
    dense = jnp.matmul(x, jnp.asarray(dw.T, jnp.bfloat16), preferred_element_type=jnp.float32)
    dense_err = _rel(dense.astype(jnp.bfloat16), ref)
    over = {}
    for schedule in ("chunked", "batched"):
        moka.schedule = schedule
        over[schedule] = _rel(jax.jit(moka.delta)(x), ref) / dense_err
    return {"name": "moka_bf16", "passed": max(over.values()) <= 1.5, "dense_rel_err": dense_err,
            "error_over_dense": over}


def check_nf4(rng) -> dict:
    """Device quantiser == host quantiser (bit for bit); round trip; dequantise-in-matmul."""
    w = rng.standard_normal((256, 512)).astype(np.float32) * 0.05
    w[3, :64] = 0.0  # an all-zero block
    host = quant.quantize(w, "nf4", block_size=64)
    packed, absmax = jax.jit(quantize_nf4_on_device, static_argnums=1)(jnp.asarray(w), 64)
    code_mismatch = int(np.sum(np.asarray(packed) != np.asarray(host.packed)))
    absmax_equal = bool(np.array_equal(np.asarray(absmax), np.asarray(host.scales)))
    deq = quant.dequantize(host, jnp.float32)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        y = quant.quant_matmul(jnp.asarray(x), host, jnp.float32)
    errs = {"round_trip": _rel(deq, w), "quant_matmul": _rel(y, x @ np.asarray(deq).T)}
    passed = code_mismatch == 0 and absmax_equal and errs["round_trip"] < 0.12 \
        and errs["quant_matmul"] < 1e-5
    return {"name": "nf4", "passed": passed, "packed_bytes_mismatched": code_mismatch,
            "absmax_equal": absmax_equal, "rel_err": errs}


def check_train(dtype) -> dict:
    """A tiny nf4 model with MoKA on q, v fits one batch: the loss falls, one compile."""
    model = random_nf4_base(tiny_config(), dtype, seed=1)
    nn.attach_adapters(model, mj.MoKAConfig(r=4), rngs=nnx.Rngs(1))
    graphdef, params, frozen = split_model(model)
    tx = optax.adamw(1e-2)
    opt_state, step = tx.init(params), TrainStep(graphdef, tx)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 512, (1, 4, 32), dtype=np.int32))
    batch = one_example_rows(ids)
    losses = []
    for _ in range(20):
        params, opt_state, metrics = step(params, opt_state, frozen, batch)
        losses.append(float(metrics["loss"]))
    passed = bool(np.all(np.isfinite(losses))) and losses[-1] < losses[0] - 0.5 \
        and step.compilations == 1
    return {"name": "train_step", "passed": passed, "loss_first_last": [losses[0], losses[-1]],
            "compilations": step.compilations}


def run_checks(args) -> dict:
    rng = np.random.default_rng(0)
    checks = [check_kron(rng), check_moka_bf16(rng), check_nf4(rng),
              check_train(jnp.dtype(args.dtype))]
    backend = jax.default_backend()
    if args.expect_backend:
        checks.append({"name": "backend", "passed": backend == args.expect_backend,
                       "expected": args.expect_backend})
    return {"bench": "gpu_check", "backend": backend, "device_kind": jax.devices()[0].device_kind,
            "passed": all(c["passed"] for c in checks), "checks": checks}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer model (CPU smoke test)")
    ap.add_argument("--batch", type=int, help="default 8 (tiny: 2)")
    ap.add_argument("--seq", type=int, help="default 512 (tiny: 64)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps, the first compiles")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {VARIANTS}")
    ap.add_argument("--moka-r", type=int, default=10)
    ap.add_argument("--token-chunk", type=int,
                    help=f"tokens per step of MoKA's chunked schedule (default "
                         f"kron_schedule.TOKEN_CHUNK, {kron_schedule.TOKEN_CHUNK}, tuned on a CPU)")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--remat", action="store_true", help="rematerialise each decoder layer")
    ap.add_argument("--check", action="store_true", help="correctness checks, then exit")
    ap.add_argument("--expect-backend", help="--check fails unless jax runs on this (e.g. gpu)")
    ap.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)  # the child's variant
    argv = sys.argv[1:]
    args = ap.parse_args(argv)
    args.batch = (2 if args.tiny else 8) if args.batch is None else args.batch
    args.seq = (64 if args.tiny else 512) if args.seq is None else args.seq
    args.variants = [v for v in args.variants.split(",") if v]
    counts = [args.batch, args.seq, args.warmup, args.steps, args.token_chunk]
    if min(c for c in counts if c is not None) < 1:
        ap.error("--batch, --seq, --warmup, --steps and --token-chunk must be >= 1")
    if bad := sorted(set(args.variants) - set(VARIANTS)):
        ap.error(f"unknown variants {bad}; choose from {VARIANTS}")
    if args.check:
        res = run_checks(args)
        print(json.dumps(res))
        sys.exit(0 if res["passed"] else 1)
    if args.only:
        print(json.dumps(run_variant(args, args.only)))
        return
    res = run_children(args, argv)
    print_table(res)
    print(json.dumps(res))
    sys.exit(0 if all("error" not in x for x in res["variants"].values()) else 1)


if __name__ == "__main__":
    main()
