"""Where one MoKA r=4 nf4 train step's time goes, op by op (XLA's own profile of the step).

profile_step.py times parts jitted alone; this traces the whole compiled step as it runs
(jax.profiler) and reads the trace back:
- thread time per op family (fusion kind with its numbering stripped; loops left out: their
  bodies' ops are counted on their own),
- how much of the step's wall time has 0, 1 or >= 2 ops running at once (on a 2-core machine a
  single op running alone leaves a core idle unless that op is multi-threaded),
- the op families that most often run alone,
- the heaviest fused ops by what the step computes there: each fusion's HLO metadata names the
  JAX operation it came from (e.g. `jvp(jit(quant_matmul))/...i,oi->...o/dot_general`), grouped
  by (result shape, operation).

    python bench/trace_step.py [--layers 30] [--top 25] [--trace-dir DIR]

Last stdout line: one JSON object. Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LOOP_OPS = ("while", "conditional", "call")  # their bodies' ops are traced on their own


def family(name: str) -> str:
    """'ynn_fusion.1935' -> 'ynn_fusion'; 'copy_bitcast_fusion' stays."""
    return re.sub(r"[._]\d+$", "", name)


def op_events(trace: dict) -> list[dict]:
    """The trace's executed HLO ops (complete events with an hlo_op), loops left out."""
    return [e for e in trace["traceEvents"]
            if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
            and not family(e["name"]).startswith(LOOP_OPS)]


def concurrency(events: list[dict]) -> dict:
    """Wall seconds with 0, 1 and >= 2 ops running, over the span of the events, and the
    seconds each op family ran alone."""
    edges = sorted([(e["ts"], 1, i) for i, e in enumerate(events)]
                   + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)])
    if not edges:
        return {"span_s": 0.0, "seconds_at": {}, "alone_s": {}}
    at, alone, active = collections.Counter(), collections.Counter(), set()
    last = edges[0][0]
    for t, d, i in edges:
        if len(active) == 1:
            alone[family(events[next(iter(active))]["name"])] += t - last
        at[min(len(active), 2)] += t - last
        last = t
        active.add(i) if d == 1 else active.discard(i)
    return {"span_s": (edges[-1][0] - edges[0][0]) / 1e6,
            "seconds_at": {("2+" if k == 2 else str(k)): v / 1e6 for k, v in sorted(at.items())},
            "alone_s": {k: v / 1e6 for k, v in alone.most_common()}}


def hlo_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
    """fusion / op name -> (result shape, the JAX operation its metadata names)."""
    out = {}
    pat = re.compile(r'\s*%([\w.\-]+) = (\S+) [\w\-]+\(.*?op_name="([^"]*)"')
    for line in hlo_text.splitlines():
        m = pat.match(line)
        if m:
            op = m.group(3).replace("jit(_impl)/", "").replace("while/body/closed_call/", "loop/")
            out[m.group(1)] = (m.group(2).split("{")[0], op)
    return out


def summarise(events: list[dict], sources: dict, top: int) -> dict:
    fam, fam_n = collections.Counter(), collections.Counter()
    by_src, by_src_n = collections.Counter(), collections.Counter()
    for e in events:
        fam[family(e["name"])] += e["dur"]
        fam_n[family(e["name"])] += 1
        key = sources.get(e["args"]["hlo_op"], ("?", e["args"]["hlo_op"]))
        by_src[key] += e["dur"]
        by_src_n[key] += 1
    return {"thread_seconds": sum(fam.values()) / 1e6,
            "families": [{"family": k, "seconds": v / 1e6, "calls": fam_n[k]}
                         for k, v in fam.most_common(top)],
            "operations": [{"shape": k[0], "operation": k[1][-100:], "seconds": v / 1e6,
                            "calls": by_src_n[k]} for k, v in by_src.most_common(top)],
            **concurrency(events)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temp dir)")
    args = ap.parse_args(argv)
    import jax

    import roofline
    from moka_jax.support import machine

    compiled, call_args, _, _ = roofline.compiled_step(args.layers)
    for _ in range(2):  # the first call allocates; the second is a warm step
        roofline.call_step(compiled, call_args)
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="trace_step_")
    jax.profiler.start_trace(trace_dir)
    wall = roofline.call_step(compiled, call_args)
    jax.profiler.stop_trace()
    files = sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))
    if not files:
        raise SystemExit(f"no trace written under {trace_dir}: this jax build has no profiler")
    events = op_events(json.load(gzip.open(files[-1])))
    res = {"bench": "trace_step", "machine": machine.describe(), "layers": args.layers,
           "batch": [8, 256], "step_seconds_traced": wall, "trace": files[-1],
           **summarise(events, hlo_sources(compiled.as_text()), args.top)}
    for f in res["families"][:12]:
        print(f"{f['seconds']:8.3f} s {f['calls']:7d}  {f['family']}")
    print(f"wall {res['span_s']:.2f} s: " + ", ".join(
        f"{k} ops running {v:.2f} s" for k, v in res["seconds_at"].items()))
    for o in res["operations"][:12]:
        print(f"{o['seconds']:8.3f} s {o['calls']:6d}  {o['shape']:18s} {o['operation']}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
