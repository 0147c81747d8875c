"""The train step against this machine's own limit (issue 25): a CPU roofline.

1. The machine's practical peak: f32 GEMM GFLOP/s on the step's matmul shapes (2048 tokens x
   SmolLM2-135M's q/k/v/o, gate/up and down), jitted XLA and torch (a child process, all
   cores); their flop-weighted rate over the step's mix of shapes; and memory bandwidth (a
   numpy copy, one thread, and an XLA reduction, all cores), GB/s.
2. The MoKA r=4 nf4 train step (SmolLM2 shapes, random weights, batch 8 x 256, 16 scored
   positions a row, 30 layers): FLOPs by count (base matmuls forward + dx, attention core
   forward + backward over the full score matrix, the usual model-flops convention, though
   the step's causal query blocks compute 10 of its 16 tiles at T = 256; labelled-only head
   forward + dx; adapters and elementwise work not counted) and by XLA's cost analysis of
   the compiled step (what it does compute); median step seconds; FLOP/s and
   its share of the XLA GEMM peak (the issue's target: >= 0.75).
3. Per part (profile_step's parts, each jitted alone as the step runs it): seconds, XLA's flop
   count, GFLOP/s and share of the peak.

Every JSON records the machine instance (moka_jax.support.machine.describe: CPU model, family /
model / stepping / microcode, clock, caches, SMT, flag digest) and the XLA flags. Benchmark on
a quiet machine. Last stdout line: one JSON object.

    python bench/roofline.py [--steps 3] [--repeats 5] [--no-parts] [--no-torch]
                             [--attention-block N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOKENS = 2048  # 8 rows x 256: the step's GEMM height
# (k, n) of x @ W over the step's linears and their dx (x @ W.T): q/o (576 x 576), k/v
# (576 -> 192), gate/up (576 -> 1536) and down (1536 -> 576); the flop weights are how many of
# each a layer's forward + dx does
GEMMS = {"576x576": (576, 576, 4), "576x192": (576, 192, 2), "192x576": (192, 576, 2),
         "576x1536": (576, 1536, 3), "1536x576": (1536, 576, 3)}


def gemm_rates_xla(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from timing import median_seconds

    rng = np.random.default_rng(0)
    f = jax.jit(lambda a, b: a @ b)
    out = {}
    for name, (k, n, _) in GEMMS.items():
        a = jnp.asarray(rng.standard_normal((TOKENS, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        out[name] = 2 * TOKENS * k * n / median_seconds(f, (a, b), repeats, warmups=2) / 1e9
    return out


def gemm_rates_torch(repeats: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    out = {}
    for name, (k, n, _) in GEMMS.items():
        a, b = torch.randn(TOKENS, k), torch.randn(k, n)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        out[name] = 2 * TOKENS * k * n / statistics.median(times) / 1e9
    return {"gflops": out, "threads": torch.get_num_threads(), "torch": torch.__version__}


def weighted(rates: dict) -> float:
    """GFLOP/s over the step's mix of GEMM shapes: total flops / total time."""
    fl = {k: 2 * TOKENS * kk * n * w for k, (kk, n, w) in GEMMS.items()}
    return sum(fl.values()) / sum(fl[k] / rates[k] for k in fl)


def bandwidth(repeats: int) -> dict:
    """GB/s: numpy copy of 512 MiB (read + write, one thread) and XLA's sum of it (read)."""
    import jax
    import jax.numpy as jnp

    from timing import median_seconds

    n = 128 * 2**20  # float32 elements: 512 MiB
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    x = jnp.asarray(a)
    del a, b
    t = median_seconds(jax.jit(jnp.sum), (x,), repeats)
    return {"numpy_copy_gb_s": 2 * n * 4 / statistics.median(times) / 1e9,
            "xla_sum_gb_s": n * 4 / t / 1e9}


def counted_flops(layers: int, B: int, T: int, labelled: int, config=None) -> dict:
    """The step's flops by count (multiply-add = 2), per part (SmolLM2 shapes unless config)."""
    from moka_jax.models import presets

    c = config or presets.smollm2(layers)
    layers = c.num_hidden_layers
    D, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    per_token = 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * I)  # one layer, forward
    base = 2 * per_token * B * T * layers                   # forward + dx (the base is frozen)
    attn = 12 * B * N * T * T * H * layers                  # QK^T, PV; backward: 4 more of them
    head = 4 * B * labelled * D * V                         # forward + dx (embedding frozen)
    return {"base matmuls": base, "attention core": attn, "lm_head (labelled)": head,
            "total": base + attn + head}


def build_step(layers: int, B: int, T: int, labelled: int, config=None):
    """(TrainStep, its arguments, trainable params) of the MoKA r=4 nf4 step on a random batch."""
    import jax.numpy as jnp
    import optax

    from moka_jax import nn
    from moka_jax.training.step import TrainStep, one_example_rows, split_model
    from train_step import build

    rng = np.random.default_rng(0)
    model = build("moka", layers, config=config)
    ids = rng.integers(0, model.config.vocab_size, (1, B, T), dtype=np.int32)
    batch = one_example_rows(jnp.asarray(ids), labelled)
    n = nn.count_params(model)
    graphdef, params, frozen = split_model(model)
    del model
    tx = optax.adamw(2e-4)
    return TrainStep(graphdef, tx), (params, tx.init(params), frozen, batch), n


def cpu_times() -> dict:
    """The machine's CPU time by kind (/proc/stat, seconds): steal is what the hypervisor gave
    other guests while this one wanted the CPU."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return {}
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    hz = os.sysconf("SC_CLK_TCK")
    return {k: int(v) / hz for k, v in zip(names, fields)}


def compiled_step(layers: int, B: int = 8, T: int = 256, labelled: int = 16,
                  compiler_options: dict | None = None, config=None):
    """(compiled step, its arguments as a list the calls update, trainable params, compile
    seconds): compiled once, ahead of time, so its cost analysis and its timed calls share one
    executable; `compiler_options` are XLA options for this executable alone."""
    step, args, n = build_step(layers, B, T, labelled, config=config)
    t0 = time.perf_counter()
    compiled = step._step.lower(*args).compile(compiler_options=compiler_options or None)
    return compiled, list(args), n, time.perf_counter() - t0


def call_step(compiled, args: list) -> float:
    """Seconds of one step; the new params and optimizer state replace args[0] and args[1]
    (the step donates them)."""
    import jax

    t0 = time.perf_counter()
    args[0], args[1], m = compiled(*args)
    jax.block_until_ready(m["loss"])
    return time.perf_counter() - t0


def step_measure(layers: int, B: int, T: int, labelled: int, steps: int) -> dict:
    from timing import xla_flops

    compiled, args, n, compile_s = compiled_step(layers, B, T, labelled)
    xla = xla_flops(compiled)
    compile_s += call_step(compiled, args)
    before = cpu_times()
    times = [call_step(compiled, args) for _ in range(1 + steps)]
    after = cpu_times()
    spent = {k: after[k] - before[k] for k in after}
    total = sum(spent.values()) or None
    return {"cpu_share_during_steps": {k: v / total for k, v in spent.items()} if total else None,
            "trainable_params": n, "first_step_seconds": compile_s,
            "step_seconds": statistics.median(times[1:]), "step_seconds_all": times[1:],
            "xla_flops": xla}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--labelled", type=int, default=16, help="scored positions per row")
    ap.add_argument("--no-parts", action="store_true", help="skip the per-part timings")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--attention-block", type=int, default=None,
                    help="query rows per causal attention block (default: the model's; a "
                         "value >= the sequence length computes the full score matrix)")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_child:
        print(json.dumps(gemm_rates_torch(args.repeats)))
        return 0
    from moka_jax.models import llama
    from moka_jax.support import machine

    if args.attention_block:
        llama.ATTENTION_BLOCK = args.attention_block
    B, T = 8, 256
    res = {"bench": "roofline", "machine": machine.describe(), "jax_kernels": machine.jax_kernels(),
           "batch": [B, T], "layers": args.layers, "labelled_per_row": args.labelled,
           "attention_block": llama.ATTENTION_BLOCK}
    xla = gemm_rates_xla(args.repeats)
    res["peak"] = {"xla_gemm_gflops": xla, "xla_gemm_peak_gflops": max(xla.values()),
                   "xla_gemm_step_mix_gflops": weighted(xla), **bandwidth(args.repeats)}
    if not args.no_torch:
        out = subprocess.run([sys.executable, __file__, "--torch-child", "--repeats",
                              str(args.repeats)], stdout=subprocess.PIPE, text=True, check=True)
        tor = json.loads(out.stdout.strip().splitlines()[-1])
        res["peak"].update(torch_gemm_gflops=tor["gflops"], torch_threads=tor["threads"],
                           torch_gemm_peak_gflops=max(tor["gflops"].values()),
                           torch_gemm_step_mix_gflops=weighted(tor["gflops"]))
    peak = res["peak"]["xla_gemm_peak_gflops"]
    counted = counted_flops(args.layers, B, T, args.labelled)
    s = step_measure(args.layers, B, T, args.labelled, args.steps)
    rate = counted["total"] / s["step_seconds"] / 1e9
    res["step"] = {**s, "counted_flops": counted, "counted_gflops_per_s": rate,
                   "xla_gflops_per_s": (s["xla_flops"] / s["step_seconds"] / 1e9
                                        if s["xla_flops"] else None),
                   "share_of_xla_gemm_peak": rate / peak,
                   "share_of_xla_gemm_step_mix": rate / res["peak"]["xla_gemm_step_mix_gflops"]}
    if not args.no_parts:
        from profile_step import jax_parts

        p = jax_parts("moka_nf4", args.layers, B, T, max(2, args.repeats // 2))
        res["parts"] = {}
        for name, sec in p["parts_seconds"].items():
            fl = p["parts_xla_flops"].get(name)
            res["parts"][name] = {"seconds": sec, "xla_flops": fl,
                                  "gflops_per_s": fl / sec / 1e9 if fl and sec else None,
                                  "share_of_peak": fl / sec / 1e9 / peak if fl and sec else None}
        res["parts_alternatives_seconds"] = p["alternatives_seconds"]
        res["parts_whole_step_seconds"] = p["step_seconds"]
    res["target"] = {"share_of_xla_gemm_peak": ">= 0.75"}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
