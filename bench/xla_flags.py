"""Does an XLA:CPU flag (or bf16 compute) speed up our train step? Each set runs in its own process:
SmolLM2-135M shapes (random weights), nf4 base, MoKA r=4 on q/v, the trainer's TrainStep on a
packed batch (--rows x --seq, --labelled scored positions per row), plus one dense f32
matmul forward + dx (8*256 x 576 -> 1536). Median of --steps steps after one warm-up.
Last stdout line: one JSON object.

    python bench/xla_flags.py [--steps 3] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "bf16_compute": "",  # not a flag: the same step with model.dtype bfloat16
}


def child(steps: int, layers: int, rows: int, seq: int, labelled: int, dtype: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from moka_jax.training.step import TrainStep, one_example_rows, split_model
    from train_step import build

    from timing import median_seconds

    def timed(fn, *args):
        return median_seconds(fn, args, steps)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows * seq, 576)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((576, 1536)), jnp.float32)
    mm = jax.jit(lambda x, w: jax.vjp(lambda x: x @ w, x)[1](jnp.ones((x.shape[0], 1536)))[0])
    matmul = timed(mm, x, w)

    graphdef, params, frozen = split_model(build("moka", layers, jnp.dtype(dtype)))
    tx = optax.adamw(2e-4)
    state = {"p": params, "o": tx.init(params)}
    step = TrainStep(graphdef, tx)
    ids = jnp.asarray(rng.integers(0, 49152, (1, rows, seq)), jnp.int32)
    batch = one_example_rows(ids, labelled)

    def run(b):
        state["p"], state["o"], m = step(state["p"], state["o"], frozen, b)
        return m["loss"]
    t0 = time.perf_counter()
    jax.block_until_ready(run(batch))
    first = time.perf_counter() - t0
    t = timed(run, batch)
    return {"matmul_seconds": matmul, "step_seconds": t, "compile_seconds": max(first - t, 0.0)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--labelled", type=int, default=16)
    ap.add_argument("--sets", default=",".join(FLAG_SETS))
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = (args.steps, args.layers, args.rows, args.seq, args.labelled, args.dtype)
    if args.child:
        print(json.dumps(child(*shape)))
        return
    from moka_jax.support import machine

    res = {"bench": "xla_flags", "machine": machine.describe(), "rows_seq": [args.rows, args.seq],
           "layers": args.layers, "sets": {}}
    for name in args.sets.split(","):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FLAG_SETS[name])
        out = subprocess.run([sys.executable, __file__, "--child", "--steps", str(args.steps),
                              "--layers", str(args.layers), "--rows", str(args.rows),
                              "--seq", str(args.seq), "--labelled", str(args.labelled),
                              "--dtype", "bfloat16" if name == "bf16_compute" else "float32"],
                             stdout=subprocess.PIPE, text=True, env=env)
        lines = out.stdout.strip().splitlines()
        res["sets"][name] = ({"flags": FLAG_SETS[name], **json.loads(lines[-1])}
                             if out.returncode == 0 and lines else
                             {"flags": FLAG_SETS[name], "error": f"exit {out.returncode}"})
    base = res["sets"]["default"].get("step_seconds")
    for r in res["sets"].values():
        if base and "step_seconds" in r:
            r["step_over_default"] = r["step_seconds"] / base
    print(json.dumps(res))


if __name__ == "__main__":
    main()
