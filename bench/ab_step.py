"""Interleaved A/B of the MoKA r=4 nf4 train step (SmolLM2 shapes, random weights, 8 x 256, 16
scored positions a row) under two in-process settings: both steps are compiled first, then
timed alternately, so the slow drift of a shared machine falls on both alike (separate
processes minutes apart differed by 15% with the same code on one quiet machine).

Settings: --attention-block A B (query rows per causal attention block; a value >= 256 is the
full score matrix). Last stdout line: one JSON object.

    python bench/ab_step.py --attention-block 100000 64 [--repeats 5] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention-block", type=int, nargs=2, required=True, metavar=("A", "B"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args(argv)
    import jax

    import roofline
    from moka_jax.models import llama
    from moka_jax.support import machine

    res = {"bench": "ab_step", "machine": machine.describe(), "jax_kernels": machine.jax_kernels(),
           "layers": args.layers, "batch": [8, 256], "settings": {}}
    steps = {}
    for block in args.attention_block:
        llama.ATTENTION_BLOCK = block  # read when the step is traced, at its first call
        step, call_args, _ = roofline.build_step(args.layers, 8, 256, 16)
        t0 = time.perf_counter()
        p, o, m = step(*call_args)
        jax.block_until_ready(m["loss"])
        steps[block] = (step, [p, o, call_args[2], call_args[3]])
        res["settings"][str(block)] = {"first_step_seconds": time.perf_counter() - t0,
                                       "xla_flops": roofline.step_xla_flops(step, steps[block][1])}
    times = {b: [] for b in args.attention_block}
    for _ in range(args.repeats):
        for block, (step, a) in steps.items():
            t0 = time.perf_counter()
            a[0], a[1], m = step(*a)
            jax.block_until_ready(m["loss"])
            times[block].append(time.perf_counter() - t0)
    for block, t in times.items():
        res["settings"][str(block)].update(step_seconds=statistics.median(t), step_seconds_all=t)
    a, b = (res["settings"][str(x)]["step_seconds"] for x in args.attention_block)
    res["b_over_a_step_time"] = b / a
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
