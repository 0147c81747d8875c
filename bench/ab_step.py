"""Interleaved A/B of the MoKA r=4 nf4 train step (SmolLM2 shapes, random weights, 8 x 256, 16
scored positions a row) under two in-process settings: both steps are compiled first, then
timed alternately, so the slow drift of a shared machine falls on both alike (separate
processes minutes apart differed by 15% with the same code on one quiet machine).

A setting is a comma-separated list of key=value (empty: the defaults):
    block=N   query rows per causal attention block (llama.ATTENTION_BLOCK; >= 256: the full
              score matrix)
    chunk=N   tokens per step of the adapters' chunked schedule (schedules.TOKEN_CHUNK)
    xla_*=V   an XLA compile option for this setting's step alone (e.g.
              xla_cpu_prefer_vector_width=512, xla_cpu_use_onednn=true): passed to
              `.compile(compiler_options=...)`, so flags too get an in-process A/B
Last stdout line: one JSON object.

    python bench/ab_step.py --a block=100000 --b block=64 [--repeats 5] [--layers 30]
    python bench/ab_step.py --a "" --b xla_cpu_prefer_vector_width=512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

TRACE_KEYS = {"block": ("moka_jax.models.llama", "ATTENTION_BLOCK"),
              "chunk": ("moka_jax.core.schedules", "TOKEN_CHUNK")}


def parse_setting(text: str) -> tuple[dict, dict]:
    """'block=64,xla_cpu_use_onednn=true' -> ({'block': 64}, {'xla_cpu_use_onednn': 'true'})."""
    trace, xla = {}, {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise SystemExit(f"setting {item!r}: write key=value (keys: block, chunk, xla_*)")
        if key in TRACE_KEYS:
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"setting {item!r}: {key} takes a positive whole number")
            trace[key] = int(value)
        elif key.startswith("xla_"):  # XLA wants bools as bools ('true' is refused)
            xla[key] = {"true": True, "false": False}.get(value.lower(), value)
        else:
            raise SystemExit(f"setting {item!r}: unknown key {key!r} (block, chunk or xla_*)")
    return trace, xla


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="", help="setting A (default: the library's defaults)")
    ap.add_argument("--b", required=True, help="setting B")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args(argv)
    settings = {"a": parse_setting(args.a), "b": parse_setting(args.b)}
    import importlib

    import roofline
    from timing import xla_flops
    from moka_jax.support import machine

    res = {"bench": "ab_step", "machine": machine.describe(), "jax_kernels": machine.jax_kernels(),
           "layers": args.layers, "batch": [8, 256], "settings": {}}
    defaults = {k: getattr(importlib.import_module(m), a) for k, (m, a) in TRACE_KEYS.items()}
    steps = {}
    for name, (trace, xla) in settings.items():
        for key, (mod, attr) in TRACE_KEYS.items():  # read when the step is traced (lowered)
            setattr(importlib.import_module(mod), attr, trace.get(key, defaults[key]))
        compiled, call_args, _, compile_s = roofline.compiled_step(args.layers,
                                                                   compiler_options=xla)
        roofline.call_step(compiled, call_args)  # the first call allocates
        steps[name] = (compiled, call_args)
        res["settings"][name] = {"setting": {**defaults, **trace, **xla}, "compile_seconds": compile_s,
                                 "xla_flops": xla_flops(compiled)}
    for key, (mod, attr) in TRACE_KEYS.items():
        setattr(importlib.import_module(mod), attr, defaults[key])
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, (compiled, a) in steps.items():
            times[name].append(roofline.call_step(compiled, a))
    for name, t in times.items():
        res["settings"][name].update(step_seconds=statistics.median(t), step_seconds_all=t)
    res["b_over_a_step_time"] = (res["settings"]["b"]["step_seconds"]
                                 / res["settings"]["a"]["step_seconds"])
    res["b_over_a_min_step_time"] = min(times["b"]) / min(times["a"])
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
