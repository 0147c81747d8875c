"""MoKA against QLoRA-style baselines on SmolLM2-135M-Instruct (nf4 base), commonsense reasoning.

The protocol is configs/experiments/sweep.yaml: per family (LoRA / DoRA; MoKA / MoKAs) the
same small lr search scored on a validation split carved from the training data, then every
method x seed at its chosen lr, then every trained adapter (and the untouched base) evaluated
on all dev items of every task in choice and generate mode. Methods are
configs/experiments/<method>.yaml over common.yaml and differ only in the adapter section.

    python bench/experiment_commonsense.py                              # the whole sweep
    python bench/experiment_commonsense.py --steps 600 --batch-size 6  # main-run length (rows)
    python bench/experiment_commonsense.py --seeds 0 1 2                # one more seed, reusing 0, 1
    python bench/experiment_commonsense.py --report-only                # RESULTS.md from saved runs
    python bench/experiment_commonsense.py --status                     # units done / left, minutes left
    python bench/experiment_commonsense.py --tiny --steps 2 ...         # random tiny model

Resumable: every (phase, method, seed or lr) is a unit with its own directory under --out,
run in its own process; a finished unit (result.json) is reused, a killed one resumes from its
trainer checkpoint (sweep.yaml save_every) and from its finished evaluation modes. --out/
sweep.json records the settings; a sweep with other settings over it is refused before any
work (nothing is deleted): pass another --out. Methods, seeds and lr values may be added.
The report (tables, paired bootstrap intervals, plots) goes into the generated section of
RESULTS.md (bench/results_report.py); the trained adapters are copied to <figures>/adapters.
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_report  # noqa: E402

from moka_jax.support.machine import one_line  # noqa: E402
from tinymode import TINY_OVERRIDES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "experiments"
SWEEP = CONFIGS / "sweep.yaml"
PHASES = ("search", "train")
# Every key a sweep.yaml must have; the CLI flags below override some of them.
PROTOCOL_KEYS = ("methods", "reference", "families", "search", "seeds", "data_seed", "steps",
                 "batch_size", "warmup_ratio", "eval_every", "save_every", "eval", "comparisons")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", default=str(SWEEP), help="the protocol (YAML)")
    ap.add_argument("--methods", nargs="+", default=None, help="default: the sweep's")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the sweep's")
    ap.add_argument("--steps", type=int, default=None, help="main-run steps (sweep: steps)")
    ap.add_argument("--batch-size", type=int, default=None, help="packed rows per step (about 2.7 examples a row)")
    ap.add_argument("--search-steps", type=int, default=None, help="steps of each lr trial")
    ap.add_argument("--limit", type=int, default=None, help="dev questions per task")
    ap.add_argument("--tasks", nargs="+", default=None, help="default: all 8")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (e.g. model.dtype=bfloat16)")
    ap.add_argument("--tiny", action="store_true", help="the random tiny model (tests)")
    ap.add_argument("--in-process", action="store_true",
                    help="run units in this process (tests; SmolLM2 wants one process each)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the saved units; train nothing")
    ap.add_argument("--status", action="store_true",
                    help="list the units done, under way and left, and the compute left; "
                         "run nothing")
    ap.add_argument("--out", default=str(REPO / "results" / "commonsense" / "sweep"),
                    help="unit records (committed, so a sweep resumes in a fresh clone; "
                         "trainer checkpoints under it are git-ignored)")
    ap.add_argument("--results", default=str(REPO / "RESULTS.md"))
    ap.add_argument("--figures", default=str(REPO / "results" / "commonsense"))
    ap.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # worker: PHASE/METHOD/TAG
    ap.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- protocol


def load_protocol(args) -> dict:
    """sweep.yaml with the CLI's overrides, checked before any work."""
    import yaml

    from moka_jax.eval.commonsense import TASKS, check_tasks

    p = yaml.safe_load(Path(args.sweep).read_text())
    missing = [k for k in PROTOCOL_KEYS if k not in p]
    if missing:
        raise SystemExit(f"{args.sweep}: missing keys {missing}")
    for key, flag in (("methods", args.methods), ("seeds", args.seeds), ("steps", args.steps),
                      ("batch_size", args.batch_size)):
        if flag is not None:
            p[key] = flag
    if args.search_steps is not None:
        p["search"] = {**p["search"], "steps": args.search_steps}
    ev = dict(p["eval"])
    for key, flag in (("limit", args.limit), ("tasks", args.tasks),
                      ("max_new_tokens", args.max_new_tokens)):
        if flag is not None:
            ev[key] = flag
    ev["tasks"] = list(TASKS) if ev["tasks"] == "all" else check_tasks(ev["tasks"])
    p["eval"] = ev
    p["overrides"] = [*(TINY_OVERRIDES if args.tiny else []), *args.set]
    p["tiny"] = bool(args.tiny)
    _check_protocol(p, args.sweep)
    return p


def _check_protocol(p: dict, source) -> None:
    def bad(msg):
        raise SystemExit(f"{source}: {msg}")

    family_of = {m: f for f, spec in p["families"].items() for m in spec["methods"]}
    for m in p["methods"]:
        if m != "base" and m not in family_of:
            bad(f"method {m!r} is in no family (families: {sorted(p['families'])})")
        if m != "base" and not (CONFIGS / f"{m}.yaml").is_file():
            bad(f"method {m!r}: {CONFIGS / (m + '.yaml')} not found")
    sizes = {f: len(spec["lrs"]) for f, spec in p["families"].items()}
    if len(set(sizes.values())) != 1:
        bad(f"every family must get the same number of lr trials; got {sizes}")
    if p["search"]["per"] not in ("method", "family"):
        bad(f"search.per = {p['search']['per']!r}, expected method or family")
    for key in ("steps", "batch_size"):
        if int(p[key]) < 1:
            bad(f"{key} = {p[key]}, expected >= 1")
    if int(p["search"]["steps"]) < 1 or not p["seeds"] or int(p["eval"]["limit"]) < 1:
        bad("search.steps, eval.limit must be >= 1 and seeds non-empty")
    unknown = [m for m in p["eval"]["modes"] if m not in ("choice", "generate")]
    if unknown:
        bad(f"eval.modes {unknown}: expected choice and / or generate")
    p["family_of"] = family_of


def reuse_key(p: dict) -> dict:
    """What saved units must share with this sweep to be reused: everything except which
    methods, seeds and lr values are run (those may be extended; a grid that gains a value
    whose trial wins makes the main runs at the old pick stale, and ensure_unit refuses them)."""
    key = {k: v for k, v in p.items() if k not in ("methods", "seeds", "family_of")}
    key["families"] = {f: {"methods": spec["methods"]} for f, spec in p["families"].items()}
    return key


def check_manifest(p: dict, out: Path) -> None:
    """Refuse, before any work, a sweep directory made with other settings (never delete)."""
    path = out / "sweep.json"
    key = json.loads(json.dumps(reuse_key(p)))
    if path.exists():
        saved = json.loads(path.read_text())["settings"]
        if saved != key:
            from moka_jax.training.checkpoint import fingerprint_diff
            diff = fingerprint_diff(saved, key)
            raise SystemExit(f"{out} holds a sweep made with other settings:\n  "
                             + "\n  ".join(diff[:12]) + "\npass another --out (nothing was "
                             "deleted), or run with the saved settings")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(path, {"settings": key})


def search_methods(p: dict) -> list[str]:
    """The methods that get lr trials: every trained method, or each family's first."""
    trained = [m for m in p["methods"] if m != "base"]
    if p["search"]["per"] == "method":
        return trained
    fams = {p["family_of"][m] for m in trained}
    return [p["families"][f]["methods"][0] for f in p["families"] if f in fams]


def lr_grid(p: dict, method: str) -> list[float]:
    return [float(x) for x in p["families"][p["family_of"][method]]["lrs"]]


def units(p: dict, phase: str) -> list[tuple[str, str, str]]:
    """Search units, or main units seed-major (every method's first seed, then the next), so
    a sweep stopped part-way holds comparable runs of every method it reached."""
    if phase == "search":
        return [("search", m, f"lr-{lr:g}") for m in search_methods(p) for lr in lr_grid(p, m)]
    out = [("train", "base", "seed-0")] if "base" in p["methods"] else []
    return out + [("train", m, f"seed-{s}") for s in p["seeds"] for m in p["methods"]
                  if m != "base"]


def unit_dir(out: Path, unit) -> Path:
    return Path(out).absolute().joinpath(*unit)


def adapter_path(out: Path, rec: dict) -> Path | None:
    """The unit's exported adapter; records keep it relative to the unit directory, so a
    committed sweep resolves in any clone."""
    rel = (rec.get("train") or {}).get("adapter_dir")
    return unit_dir(out, rec["unit"]) / rel if rel else None


def choose_lrs(p: dict, search: dict) -> dict[str, float]:
    """{method: lr}: the lowest final validation loss of its (or its family's) trials; a
    diverged trial never wins; ties go to the smaller lr."""
    best = {}
    for m in search_methods(p):
        trials = [(r["train"]["val_loss"], r["lr"]) for (_, mm, _), r in search.items() if mm == m]
        finite = [t for t in trials if t[0] is not None and t[0] == t[0] and t[0] != float("inf")]
        if not finite:
            raise SystemExit(f"every lr trial of {m} diverged: {trials}; widen the grid")
        best[m] = min(finite)[1]
    chosen = {}
    for m in p["methods"]:
        if m == "base":
            continue
        rep = m if p["search"]["per"] == "method" else p["families"][p["family_of"][m]]["methods"][0]
        chosen[m] = best[rep]
    return chosen


# ----------------------------------------------------------------------------- one unit


def unit_config(p: dict, unit, out: Path, lr: float | None):
    from moka_jax.config import load_config

    phase, method, tag = unit
    name = "common" if method == "base" else method
    value = float(tag.split("-", 1)[1])
    steps = p["search"]["steps"] if phase == "search" else p["steps"]
    seed = 0 if phase == "search" else int(value)
    lr = value if phase == "search" else lr
    sets = [*p["overrides"], f"train.steps={steps}", f"train.batch_size={p['batch_size']}",
            f"train.warmup_steps={max(1, round(p['warmup_ratio'] * steps))}",
            f"train.seed={seed}", f"data.seed={p['data_seed'] + seed}",
            f"train.eval_every={steps if phase == 'search' else p['eval_every']}",
            f"train.save_every={p['save_every']}", "train.resume=true",
            f"train.out_dir={unit_dir(out, unit) / 'run'}"]
    if lr is not None:
        sets.append(f"train.lr={lr}")
    return load_config(CONFIGS / f"{name}.yaml", sets)


def run_unit(p: dict, unit, out: Path, lr: float | None) -> dict:
    """Train (unless base) and, in the train phase, evaluate; every step saved as it ends."""
    import jax

    import moka_jax as mj
    from moka_jax.config import validate
    from moka_jax.training.loop import TrainingDiverged
    from moka_jax.training.metrics import read_metrics

    phase, method, tag = unit
    udir = unit_dir(out, unit)
    udir.mkdir(parents=True, exist_ok=True)
    cfg = validate(unit_config(p, unit, out, lr), num_devices=jax.device_count())
    rec = {"unit": list(unit), "method": method, "phase": phase, "tag": tag,
           "lr": None if method == "base" else cfg.train.lr, "seed": cfg.train.seed,
           "settings": json.loads(json.dumps(reuse_key(p))), "config": cfg.to_dict()}
    if method != "base":
        rec["train"] = _load_or(udir / "train.json", lambda: _train(cfg, udir, mj.train,
                                                                   read_metrics, TrainingDiverged))
    if phase == "search" or rec.get("train", {}).get("diverged"):
        return rec
    rec["eval"] = {}
    model = tokenizer = lconfig = None
    for mode in p["eval"]["modes"]:
        path = udir / f"eval-{mode}.json"
        if not path.exists():
            if model is None:
                model, lconfig, tokenizer = _eval_model(cfg, adapter_path(out, rec))
            _write_json(path, _evaluate(p, mode, model, lconfig, tokenizer, cfg))
        rec["eval"][mode] = json.loads(path.read_text())
    return rec


def _train(cfg, udir: Path, train, read_metrics, diverged_error) -> dict:
    t0 = time.perf_counter()
    try:
        s = train(cfg)
    except diverged_error as e:
        return {"diverged": str(e), "val_loss": None, "seconds": time.perf_counter() - t0}
    if "adapter_dir" not in s:
        raise RuntimeError(f"{cfg.name}: training stopped early; see {s['run_dir']}")
    run = Path(s["run_dir"])
    gates = run / "gates.json"
    return {"trainable_params": s["trainable_params"], "base_params": s["base_params"],
            "val_loss": s.get("val_loss"), "final_step": s["final_step"],
            "resumed_from": s["resumed_from"], "seconds": time.perf_counter() - t0,
            "run_dir": os.path.relpath(run, udir),
            "adapter_dir": os.path.relpath(s["adapter_dir"], udir),
            "metrics": read_metrics(run / "metrics.jsonl"),
            "gates": json.loads(gates.read_text()) if gates.exists() else None}


def _eval_model(cfg, adapter: Path | None):
    import moka_jax as mj

    model, tokenizer = mj.load(cfg.model, adapter, progress=True)  # the run's own base
    return model, model.config, tokenizer


def _evaluate(p, mode, model, lconfig, tokenizer, cfg) -> dict:
    """{task: summary + per-item flags / predictions} of one mode, in the run's template."""
    from moka_jax.eval import evaluate_tasks
    from moka_jax.eval.generate import eos_ids

    ev = p["eval"]
    tasks = dev_records(p)
    kw = {} if mode == "choice" else {"eos_token_ids": eos_ids(lconfig, tokenizer),
                                      "max_new_tokens": ev["max_new_tokens"]}
    t0 = time.perf_counter()
    res = evaluate_tasks(model, tokenizer, tasks, mode=mode, batch_size=ev["batch_size"],
                         template=cfg.data.template, **kw)
    out = {"seconds": time.perf_counter() - t0, "template": cfg.data.template, "tasks": {}}
    for t, r in res.items():
        item = {k: v for k, v in r.items() if k != "predictions"}
        item["flags"] = [int(x["flag"]) for x in r["predictions"]]
        item["preds"] = [x["pred"] for x in r["predictions"]]
        if mode == "generate":
            item["outputs"] = [x["output_pred"] for x in r["predictions"]]
        out["tasks"][t] = item
    return out


def _load_or(path: Path, make):
    if path.exists():
        return json.loads(path.read_text())
    value = make()
    _write_json(path, value)
    return value


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def ensure_unit(p: dict, unit, args, lr: float | None = None) -> dict:
    """The unit's saved result (same settings, same lr), else a fresh (or resumed) run."""
    path = unit_dir(args.out, unit) / "result.json"
    if path.exists():
        rec = json.loads(path.read_text())
        if rec["settings"] != json.loads(json.dumps(reuse_key(p))):
            raise SystemExit(f"{path} was made with other settings; pass another --out")
        if unit[0] == "train" and unit[1] != "base" and rec["lr"] != lr:
            raise SystemExit(f"{path} was trained at lr {rec['lr']}, the search now picks {lr}; "
                             "pass another --out (nothing was deleted)")
        print(f"[experiment] {'/'.join(unit)}: reusing {path}", flush=True)
        return rec
    print(f"[experiment] {'/'.join(unit)}: run" + (f" at lr {lr:g}" if lr else ""), flush=True)
    t0 = time.perf_counter()
    if args.in_process:
        rec = run_unit(p, unit, Path(args.out), lr)
    else:
        cmd = [sys.executable, __file__, "--unit", "/".join(unit), "--out", args.out]
        if lr is not None:
            cmd += ["--lr", repr(lr)]
        # Units of one method compile the same training and evaluation programs: a persistent
        # XLA cache (outside the repository) turns the later compilations into loads.
        env = {"JAX_COMPILATION_CACHE_DIR": str(REPO / "runs" / "xla_cache"), **os.environ}
        subprocess.run(cmd, check=True, env=env)
        rec = json.loads((unit_dir(args.out, unit) / "worker.json").read_text())
    rec["wall_seconds"] = time.perf_counter() - t0
    rec["machine"] = one_line()
    _write_json(path, rec)
    return rec


def worker(args) -> None:
    """--unit: one unit in this process; the protocol comes from --out/sweep.json."""
    p = json.loads((Path(args.out) / "sweep.json").read_text())["settings"]
    unit = tuple(args.unit.split("/"))
    _write_json(unit_dir(args.out, unit) / "worker.json", run_unit(p, unit, Path(args.out),
                                                                   args.lr))


# ----------------------------------------------------------------------------- sweep


def saved_units(out: Path, phase: str) -> dict:
    """Every finished unit of `phase` under `out` (for --report-only)."""
    found = {}
    for path in sorted((Path(out) / phase).glob("*/*/result.json")):
        rec = json.loads(path.read_text())
        found[tuple(rec["unit"])] = rec
    return found


def copy_adapters(results: dict, out_dir: Path, figures: Path) -> dict[str, str]:
    """results/.../adapters/<method>-seed<s>: the trained adapters, for anyone to score."""
    out = {}
    for (_, method, tag), rec in results.items():
        src = adapter_path(out_dir, rec)
        if src is None:
            continue
        dst = figures / "adapters" / f"{method}-{tag.replace('-', '')}"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        out[f"{method}/{tag}"] = str(dst)
    return out


def status(p: dict, out: Path) -> dict:
    """Where a sweep stands: each unit done (its minutes), under way (the trainer's last
    checkpoint, finished evaluation modes) or to run, and the compute left, estimated per unit
    from the finished units of its phase and method (else its phase, base aside)."""
    lines, done, todo = [], {}, []
    for phase in PHASES:
        for u in units(p, phase):
            d, name = unit_dir(out, u), "/".join(u)
            if (d / "result.json").exists():
                done[u] = json.loads((d / "result.json").read_text()).get("wall_seconds", 0.0)
                lines.append(f"done     {name:<32} {done[u] / 60:6.1f} min")
                continue
            todo.append(u)
            steps = sorted(int(c.name) for c in (d / "run" / "checkpoints").glob("[0-9]*")
                           if c.name.isdigit())
            evals = [m for m in p["eval"]["modes"] if (d / f"eval-{m}.json").exists()]
            state = ("trained" if (d / "train.json").exists() else
                     f"checkpoint at step {steps[-1]}" if steps else "")
            state = ", ".join(x for x in (state, *(f"{m} evaluated" for m in evals)) if x)
            lines.append(f"{'partial' if state else 'to run':<8} {name:<32} {state}")

    def estimate(u):
        same = [s for v, s in done.items() if v[:2] == u[:2]]
        like = [s for v, s in done.items() if v[0] == u[0] and "base" not in (u[1], v[1])]
        return float(np.mean(same or like)) if (same or like) else None

    est = [estimate(u) for u in todo]
    known = [e for e in est if e is not None]
    summary = {"done": len(done), "to_run": len(todo), "done_minutes": sum(done.values()) / 60,
               "left_minutes_estimate": sum(known) / 60 if known else None,
               "units_without_estimate": ["/".join(u) for u, e in zip(todo, est) if e is None]}
    return {"lines": lines, **summary}


def main(argv=None):
    args = parse_args(argv)
    if args.unit:
        return worker(args)
    t0 = time.perf_counter()
    p = load_protocol(args)
    out = Path(args.out)
    for unit in units(p, "search"):  # every config parses before anything heavy starts
        unit_config(p, unit, out, None)
    for m in p["methods"]:
        unit_config(p, ("train", m, f"seed-{p['seeds'][0]}"), out, 1e-3)
    check_manifest(p, out)
    if args.status:
        st = status(p, out)
        print("\n".join(st.pop("lines")))
        print(json.dumps({"bench": "experiment_commonsense_status", **st}))
        return
    if args.report_only:
        search, results = saved_units(out, "search"), saved_units(out, "train")
        chosen = {m: r["lr"] for (_, m, _), r in results.items() if r["lr"] is not None}
    else:
        search = {u: ensure_unit(p, u, args) for u in units(p, "search")}
        chosen = choose_lrs(p, search)
        results = {}
        for u in units(p, "train"):
            fresh = not (unit_dir(out, u) / "result.json").exists()
            results[u] = ensure_unit(p, u, args, chosen.get(u[1]))
            if fresh:  # RESULTS.md follows a long sweep unit by unit
                try:
                    write_report(p, search, results, chosen, args, argv, t0)
                except Exception:  # an interim report never stops hours of compute
                    traceback.print_exc()
                    print("[experiment] interim report failed (above); the sweep goes on and "
                          "the final report will raise it again", flush=True)
    report = write_report(p, search, results, chosen, args, argv, t0)
    print(report.pop("table"))
    print(json.dumps({"bench": "experiment_commonsense", **report}))


def write_report(p, search, results, chosen, args, argv, t0) -> dict:
    figures = Path(args.figures)
    adapters = copy_adapters(results, Path(args.out), figures)
    return results_report.write_report(
        p, search, results, chosen, results_md=Path(args.results), figures=figures,
        command=command_line(argv), wall_seconds=time.perf_counter() - t0, adapters=adapters,
        dev=dev_records(p))


def dev_records(p) -> dict:
    """{task: the dev records every unit is evaluated on} (the report's label-prior rows)."""
    from moka_jax.eval import load_tasks

    return load_tasks(REPO / "data" / "commonsense", p["eval"]["tasks"], limit=p["eval"]["limit"])


def command_line(argv) -> str:
    argv = sys.argv[1:] if argv is None else argv
    return "python bench/experiment_commonsense.py" + "".join(
        f" {a}" if a.startswith("-") or " " not in a else f" '{a}'" for a in argv)


if __name__ == "__main__":
    main()
