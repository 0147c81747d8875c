"""Does MoKA beat LoRA per trainable parameter where adapter capacity binds? (issue 21)

The protocol is configs/capacity/protocol.yaml: three budgets (LoRA r = 1 / 4 / 16 on q/v of
SmolLM2-135M-Instruct, nf4), every method sized to each, the same lr search, two seeds, and
    E1  memorise N random key -> value pairs: greedy recall, value NLL, bits stored;
    E2  GSM8K: held-out response NLL, forgetting (NLL change on Dolly responses) and zero-shot
        content-scored commonsense accuracy (acc, acc_norm, as lm-evaluation-harness).

    python bench/capacity.py                    # run every unit left (resumes), then the report
    python bench/capacity.py --only e1          # one experiment
    python bench/capacity.py --first 'e2/main/moka-*/seed1*'   # these units before the rest
    python bench/capacity.py --status           # units done / left, compute spent and left
    python bench/capacity.py --report-only      # RESULTS.md section + plots from saved units
    python bench/capacity.py --pilot e1 --methods lora --budgets r1 r16 --set e1.pairs=512

Every unit (experiment, phase, method, budget, seed, lr) has a directory under --out holding
its config, training curve and result.json (committed, so the suite resumes in a fresh clone);
a unit runs in its own processes (train.py, then this file as the evaluating worker), and a
killed unit resumes from its trainer checkpoint (git-ignored). E1's power check (LoRA at the
smallest and largest budget, every seed) runs first among E1's main units; when it fails, the
other E1 units are held (--status lists them) until E1 is resized. Units only ever add: a protocol
whose experiment settings changed is refused (pass another --out). Last stdout line: one JSON
object (see report()).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capacity_plan import (CONFIGS, REPO, Unit, adapter_section, all_units,  # noqa: E402
                           budget_ends, budget_params, e3_fitted, e3_path, e3_targets,
                           load_protocol, main_set, power_units, read_result, status, unit_done,
                           write_json)
import capacity_report  # noqa: E402

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", default=str(CONFIGS / "protocol.yaml"))
    ap.add_argument("--out", default=str(REPO / "results" / "capacity"))
    ap.add_argument("--results", default=str(REPO / "RESULTS.md"))
    ap.add_argument("--only", nargs="+", default=None, help="experiments to run (e1 e2 e3)")
    ap.add_argument("--first", nargs="+", default=(), metavar="PATTERN",
                    help="run first the units whose path, or a folder above it, matches (fnmatch, "
                         "e.g. 'e2/main/moka-*-r4/seed1*' or e2/main/moka-r16); the rest "
                         "follow in order")
    ap.add_argument("--status", action="store_true", help="list units; run nothing")
    ap.add_argument("--report-only", action="store_true", help="report from saved units")
    ap.add_argument("--pilot", default=None, metavar="EXP",
                    help="sizing runs under OUT/pilot: --methods x --budgets at --lr, seed 0")
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--budgets", nargs="+", default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="EXP.KEY=VALUE",
                    help="override an experiment setting (pilot sizing), e.g. e1.pairs=512")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra train.py --set for every unit (tests: model.path=random ...)")
    ap.add_argument("--in-process", action="store_true",
                    help="train and evaluate in this process (tests; SmolLM2 wants a process each)")
    ap.add_argument("--unit", default=None, help=argparse.SUPPRESS)  # worker: unit directory
    ap.add_argument("--full", action="store_true", help=argparse.SUPPRESS)  # worker: all measures
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- data


def e1_pairs(p: dict, seed: int) -> list[dict]:
    """N distinct random keys, each with a random value, from numpy's seeded PCG64."""
    e = p["e1"]
    rng = np.random.default_rng(1000 + seed)
    letters = np.array(list(ALPHABET))
    keys, out = set(), []
    while len(out) < e["pairs"]:
        key = "".join(rng.choice(letters, e["key_len"]))
        if key in keys:
            continue
        keys.add(key)
        out.append({"instruction": f"{key}:", "input": "",
                    "output": " " + "".join(rng.choice(letters, e["value_len"]))})
    return out


def e1_data_file(p: dict, out: Path, seed: int) -> Path:
    e = p["e1"]
    path = out / "e1" / "data" / f"pairs-n{e['pairs']}-k{e['key_len']}-v{e['value_len']}-s{seed}.json"
    if not path.exists():
        write_json(path, e1_pairs(p, seed))
    return path


GSM8K = REPO / "data" / "instruct" / "gsm8k" / "train.json"


def e2_splits(p: dict, out: Path) -> dict[str, Path]:
    """GSM8K's last `heldout` + `val` records (the shipped file's order, the original
    train.jsonl's) as the held-out and validation splits; training reads the records before
    them (e2_train_file); Dolly open-QA's first `forgetting` records after a seeded shuffle as
    the general-text sample."""
    e = p["e2"]
    root = out / "e2" / "data"
    names = {"heldout": root / "gsm8k-heldout.json", "val": root / "gsm8k-val.json",
             "general": root / "dolly-general.json"}
    if not all(f.exists() for f in names.values()):
        gsm = json.loads(GSM8K.read_text())
        h, v = e["heldout"], e["val"]
        write_json(names["heldout"], gsm[len(gsm) - h - v:len(gsm) - v])
        write_json(names["val"], gsm[len(gsm) - v:])
        dolly = json.loads((REPO / "data/instruct/dolly_open_qa/train.json").read_text())
        order = np.random.default_rng(0).permutation(len(dolly))
        write_json(names["general"], [dolly[i] for i in order[:e["forgetting"]]])
    return names


def e2_train_file(p: dict) -> dict:
    """The training records: GSM8K's first (all - heldout - val), or train_limit of them."""
    e = p["e2"]
    n = len(json.loads(GSM8K.read_text())) - e["heldout"] - e["val"]
    return {"path": str(GSM8K), "limit": min(n, e.get("train_limit") or n)}


# ----------------------------------------------------------------------------- one unit


def unit_config(p: dict, out: Path, u: Unit) -> tuple[str, int]:
    """The unit's train.py config (YAML text, inheriting the experiment's) and its count."""
    import yaml

    d = out / u.rel
    sec, n_params = adapter_section(p, u.method, u.budget)
    base = Path(PROTOCOL_PATH).parent / p[u.exp]["config"]
    if u.exp == "e1":
        data = e1_data_file(p, out, u.seed)
        # steps for `epochs` passes: the data's tokens over a step's row capacity (first-fit
        # packing fills rows of 128 with ~11-token pairs to about 95%)
        from moka_jax.data import load_tokenizer, tokenize

        tok = load_tokenizer(_train_set("model.tokenizer") or "smollm2")
        ids, _ = tokenize(json.loads(data.read_text()), tok, template="plain",
                          cutoff_len=int(_data_setting(p, "e1", "cutoff_len")))
        tokens = sum(len(x) for x in ids)
        base_cfg = yaml.safe_load(base.read_text())
        row_tokens = base_cfg["train"]["batch_size"] * base_cfg["data"]["buckets"][-1]
        steps = max(1, math.ceil(p["e1"]["epochs"] * tokens / (row_tokens * 0.95)))
        train_files = [{"path": str(data)}]
    else:
        e2_splits(p, out)
        steps = p["e2"]["steps"]
        train_files = [e2_train_file(p)]
    spec = p["methods"][u.method]
    cfg = {"inherit": os.path.relpath(base, d), "name": u.rel.replace("/", "_"),
           "adapter": sec,
           "data": {"train": [{k: os.path.relpath(v, REPO) if k == "path" else v
                               for k, v in f.items() if v is not None} for f in train_files],
                    "seed": 100 + u.seed},
           "train": {"lr": u.lr, "seed": u.seed, "steps": steps,
                     "warmup_steps": max(1, steps // 20),
                     "gate_lr_mult": float(spec.get("gate_lr_mult", 1.0)),
                     "out_dir": os.path.relpath(d / "run", REPO)}}
    return yaml.safe_dump(cfg, sort_keys=False), n_params


def run_unit(p: dict, out: Path, u: Unit, full: bool = True) -> dict:
    """Train (own process; resumes) then evaluate (own process); returns result.json. An E2
    search trial is measured on its validation split only unless `full`; a record measured
    so is completed (evaluation only) when a later call asks for `full`."""
    rec = read_result(out, u)
    if rec is not None:
        if full and not measured_all(rec):
            return complete_unit(out, u, rec)
        return rec
    d = out / u.rel
    d.mkdir(parents=True, exist_ok=True)
    text, n_params = unit_config(p, out, u)
    cfg_path = d / "config.yaml"
    if cfg_path.exists() and cfg_path.read_text() != text:
        raise SystemExit(f"{cfg_path} was written by another protocol; pass another --out")
    cfg_path.write_text(text)
    write_json(d / "unit.json", {"unit": u.__dict__, "planned_params": n_params})
    attempts = open_attempt(d)
    try:
        t0 = time.time()
        train_args = ["--config", str(cfg_path), *sum((["--set", s] for s in TRAIN_SETS), [])]
        if IN_PROCESS:  # tests: one process, so the tiny model's programs compile once
            import moka_jax as mj
            mj.train(str(cfg_path), list(TRAIN_SETS), quiet=True)
        else:
            subprocess.run([sys.executable, str(REPO / "train.py"), *train_args], cwd=REPO,
                           check=True)
        t_train = time.time() - t0
        _evaluate(out, u, full=full or u.exp != "e2" or u.phase != "search")
        rec = json.loads((d / "eval.json").read_text())
        rec.update(unit=u.__dict__, train_seconds=t_train, seconds=time.time() - t0)
    except BaseException:  # a failed or interrupted process: its time is known, count it
        close_attempt(d, attempts, failed=True)
        raise
    rec.update(close_attempt(d, attempts))
    write_json(d / "result.json", rec)
    return rec


def _attempts_file(d: Path) -> Path:
    # scratch like the checkpoints (git-ignored), and beside run/, which train.py keeps for
    # its own files; the result keeps the totals
    return d / "attempts.json"


def open_attempt(d: Path) -> list[dict]:
    """The unit's process attempts so far, with this one opened. A session's end kills the
    suite mid-unit and the next resumes from a checkpoint, so the last process's time alone
    undercounts the unit. An attempt a kill left open is closed at its trainer's last metrics
    write (a lower bound: the steps after that write, and any measuring, are lost to it); a
    unit begun before attempts were recorded but already trained in part says so."""
    from moka_jax.support.machine import one_line

    path, metrics = _attempts_file(d), d / "run" / "metrics.jsonl"
    atts = json.loads(path.read_text()) if path.exists() else (
        [{"unrecorded": True}] if metrics.exists() else [])
    for a in atts:
        if "start" in a and "end" not in a:
            a["end"] = max(a["start"], metrics.stat().st_mtime if metrics.exists() else 0.0)
            a["killed"] = True
    atts.append({"start": time.time(), "machine": one_line()})
    write_json(path, atts)
    return atts


def close_attempt(d: Path, atts: list[dict], failed: bool = False) -> dict:
    """Close the open attempt (`failed`: it raised, e.g. on the run directory's lock or a
    signal); the record's fields: `machine` (this process's), `attempts` (how many processes
    trained the unit), `seconds_all` (their time summed) and `seconds_all_complete` (false
    where an attempt's time is unknown or cut short)."""
    atts[-1]["end"] = time.time()
    if failed:
        atts[-1]["failed"] = True
    write_json(_attempts_file(d), atts)
    timed = [a for a in atts if "start" in a]
    return {"machine": atts[-1]["machine"], "attempts": len(atts),
            "seconds_all": sum(a["end"] - a["start"] for a in timed),
            "seconds_all_complete": len(timed) == len(atts) and not any(
                a.get("killed") for a in atts)}


def measured_all(rec: dict) -> bool:
    return rec.get("measured", "all") == "all"


def complete_unit(out: Path, u: Unit, rec: dict) -> dict:
    """Every measure of a unit first measured on its validation split only (a search trial
    that won): evaluation only, its training record and time kept."""
    t0 = time.time()
    _evaluate(out, u, full=True)
    new = json.loads((out / u.rel / "eval.json").read_text())
    new["items"] = {**rec.get("items", {}), **new["items"]}  # the validation items kept
    for k in ("val_nll", "select"):
        if k in rec:
            new.setdefault(k, rec[k])
    spent = time.time() - t0
    new.update(unit=u.__dict__, train_seconds=rec["train_seconds"], seconds=rec["seconds"] + spent)
    for k in ("machine", "attempts", "seconds_all_complete"):  # the training process's
        if k in rec:
            new[k] = rec[k]
    if "seconds_all" in rec:
        new["seconds_all"] = rec["seconds_all"] + spent
    write_json(out / u.rel / "result.json", new)
    return new


def _evaluate(out: Path, u: Unit, full: bool) -> None:
    """Run the evaluating worker on a trained unit (its own process unless --in-process)."""
    if IN_PROCESS:
        evaluate_unit(load_protocol(PROTOCOL_PATH, SETS), out, u.rel, full)
        return
    subprocess.run([sys.executable, __file__, "--protocol", PROTOCOL_PATH, "--out", str(out),
                    "--unit", u.rel, *(["--full"] if full else []),
                    *sum((["--set", s] for s in SETS), []),
                    *sum((["--train-set", s] for s in TRAIN_SETS), [])],
                   cwd=REPO, check=True)


def evaluate_unit(p: dict, out: Path, rel: str, full: bool = True) -> None:
    """Worker: load the trained adapter and measure the unit's experiment (E2: every measure
    when `full`, else the validation split only)."""
    import jax.numpy as jnp

    import moka_jax as mj

    d = out / rel
    info = json.loads((d / "unit.json").read_text())
    u = Unit(**info["unit"])
    run = d / "run"
    model, tok = mj.load(_train_set("model.path", "smollm2"), adapter=run / "adapter",
                         quant="nf4", dtype=jnp.float32, tokenizer=_train_set("model.tokenizer"))
    trainable = mj.summary(model, print_fn=None)["trainable"]
    if trainable != info["planned_params"]:
        raise SystemExit(f"{rel}: the trained adapter has {trainable} parameters, the plan "
                         f"{info['planned_params']}")
    rec = {"params": trainable, "budget_params": budget_params(p, u.budget)}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    rec["train_loss"] = [[m["step"], m["loss"]] for m in metrics if "loss" in m]
    gates = run / "gates.json"
    if gates.exists():
        g = json.loads(gates.read_text())
        ent = [float(-(np.asarray(a) * np.log(np.asarray(a) + 1e-12)).sum() / math.log(len(a)))
               for a in g.values() if len(a) > 1]
        rec["gate_entropy"] = float(np.mean(ent)) if ent else None
    if u.exp == "e1":
        rec.update(_e1_measures(p, out, u, model, tok))
    else:
        rec.update(_e2_measures(p, out, model, tok, _e2_splits_to_measure(u, full)))
    write_json(d / "eval.json", rec)


def _train_set(key: str, default=None):
    """The value a --train-set gives `key` (tests swap in the tiny model), else default."""
    for s in TRAIN_SETS:
        if s.startswith(key + "="):
            return s.split("=", 1)[1]
    return default


def _data_setting(p: dict, exp: str, key: str):
    """The experiment's data.<key> as training saw it: a --train-set's value, else its config's
    (evaluation cuts and packs as training did)."""
    import yaml

    given = _train_set(f"data.{key}")
    if given is not None:
        return yaml.safe_load(given)
    return yaml.safe_load((Path(PROTOCOL_PATH).parent / p[exp]["config"]).read_text())["data"][key]


def _scores(p, exp, model, tok, records, template):
    """Per-record response scores, cut and packed into rows as the experiment's training did
    (packed_response_scores: the head on labelled positions only, one compile per process)."""
    from moka_jax.data import TokenizedData, pad_id, tokenize
    from moka_jax.eval.perplexity import packed_response_scores

    ids, labels = tokenize(records, tok, template=template,
                           cutoff_len=int(_data_setting(p, exp, "cutoff_len")))
    data = TokenizedData(ids, labels, np.zeros(len(ids), np.int64), ["capacity"])
    return packed_response_scores(model, data, row_len=int(_data_setting(p, exp, "buckets")[-1]),
                                  rows=4, pad=pad_id(tok))


def _e1_measures(p, out, u, model, tok) -> dict:
    e = p["e1"]
    pairs = json.loads(e1_data_file(p, out, u.seed).read_text())
    s = _scores(p, "e1", model, tok, pairs, "plain")
    nll_bits = s["nll"] / math.log(2)
    h0 = e["value_len"] * math.log2(len(ALPHABET))  # a value's entropy: what there is to store
    stored = np.clip(h0 - nll_bits, 0.0, h0)
    return {"select": float(s["nll"].sum() / s["tokens"].sum()),  # value NLL per token (nats)
            "recall": float(s["greedy"].mean()), "value_nll": float(s["nll"].sum() / s["tokens"].sum()),
            "bits_stored": float(stored.sum()),
            "items": {"greedy": s["greedy"].astype(int).tolist(),
                      "nll": [round(float(x), 5) for x in s["nll"]],
                      "tokens": s["tokens"].tolist()}}


def _e2_splits_to_measure(u: Unit, full: bool) -> tuple[str, ...]:
    """The validation split only where a choice needs it: a search trial is first measured on
    it alone; the trial that wins (also that method's seed-0 main run) is then completed with
    the held-out measures, its validation record kept (complete_unit). Every other unit is
    measured on the held-out splits only: validation NLL ranks lrs, it is not a result."""
    if u.phase == "search":
        return ("heldout", "general") if full else ("val",)
    return ("heldout", "general")


def _e2_measures(p, out, model, tok, splits=("heldout", "general")) -> dict:
    """Response NLL of each split named (per item too); zero-shot accuracy with the held-out
    ones. `measured` says which: "val" (a search trial's choice) or "all"."""
    names = e2_splits(p, out)
    rec = {"items": {}, "measured": "val" if splits == ("val",) else "all"}
    for name in splits:
        records = json.loads(names[name].read_text())
        s = _scores(p, "e2", model, tok, records, "alpaca")
        rec[f"{name}_nll"] = float(s["nll"].sum() / s["tokens"].sum())
        rec["items"][name] = {"nll": [round(float(x), 5) for x in s["nll"]],
                              "tokens": s["tokens"].tolist()}
    if "heldout" in splits:
        rec.update(_zeroshot(p, model, tok))
    if "val" in splits:
        rec["select"] = rec["val_nll"]
    return rec


def _zeroshot(p: dict, model, tok) -> dict:
    """Content-scored zero-shot accuracy on the commonsense dev sets (lm-eval's protocol):
    what the instruction tuning did to the model's general ability, per task and averaged."""
    from moka_jax.eval import evaluate_zeroshot, load_tasks

    e = p["e2"]
    tasks = load_tasks(REPO / "data" / "commonsense", e.get("zeroshot_tasks") or
                       ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
                        "ARC-Challenge", "openbookqa"], e["zeroshot_limit"])
    r = evaluate_zeroshot(model, tok, tasks, batch_size=8, progress=False)
    return {"zeroshot_acc": r["average"]["acc"], "zeroshot_acc_norm": r["average"]["acc_norm"],
            "zeroshot": {t: {"acc": v["acc"], "acc_norm": v["acc_norm"], "n": v["n"],
                             "correct_norm": [int(i["pred_norm"] == i["gold"]) for i in v["items"]]}
                         for t, v in r["tasks"].items()}}


def base_e2(p: dict, out: Path) -> dict:
    """The untrained base's E2 NLLs (the reference for forgetting), measured once."""
    path = out / "e2" / "base" / "result.json"
    if path.exists():
        return json.loads(path.read_text())
    if IN_PROCESS:
        evaluate_base(p, out)
    else:
        subprocess.run([sys.executable, __file__, "--protocol", PROTOCOL_PATH, "--out",
                        str(out), "--unit", "e2/base",
                        *sum((["--train-set", s] for s in TRAIN_SETS), [])], cwd=REPO, check=True)
    return json.loads(path.read_text())


def evaluate_base(p: dict, out: Path) -> None:
    import jax.numpy as jnp

    import moka_jax as mj

    model, tok = mj.load(_train_set("model.path", "smollm2"), quant="nf4", dtype=jnp.float32,
                         tokenizer=_train_set("model.tokenizer"))
    rec = _e2_measures(p, out, model, tok, ("val", "heldout", "general"))
    write_json(out / "e2" / "base" / "result.json", rec)


# ----------------------------------------------------------------------------- driver

PROTOCOL_PATH = str(CONFIGS / "protocol.yaml")
SETS: list[str] = []         # --set: experiment settings (pilots)
TRAIN_SETS: list[str] = []   # --train-set: train.py overrides for every unit (tests)
IN_PROCESS = False           # --in-process: train and evaluate units in this process (tests)


def run_e3(p: dict, out: Path) -> None:
    """E3: train each target update (LoRA at e3.target_ranks on E2's data), then fit every
    parameterisation to each of its q/v layers (bench/capacity_e3.py) into OUT/e3/e3.json: the
    first target with the controls at the top level, the others under "more_targets"."""
    import capacity_e3

    targets = e3_targets(p, out)
    if targets is None:
        raise SystemExit("E3 needs E2's LoRA lr search first (run e2 before e3)")
    e3 = json.loads(e3_path(out).read_text()) if e3_path(out).exists() else None
    e = p["e3"]
    for i, target in enumerate(targets):
        if e3 is not None and target.rel in e3_fitted(e3):
            continue
        if i > 0 and e3 is None:
            raise SystemExit(f"E3: {target.rel} is fitted after the headline target "
                             f"{targets[0].rel}, which has no fits")
        print(f"[capacity] {target.rel} (E3's target update)", flush=True)
        run_unit(p, out, target)
        adapter = out / target.rel / "run" / "adapter"
        if not adapter.is_dir():  # run/ is not committed: a fresh clone has the record only
            raise SystemExit(f"E3: the adapter of {target.rel} is not here ({adapter}); move "
                             f"{out / target.rel / 'result.json'} aside to train it again")
        res = capacity_e3.main(["--adapter", str(adapter),
                                "--steps", str(e["steps"]), "--lr", str(e["lr"]),
                                "--ranks", *[str(r) for r in p["budgets"].values()],
                                *(["--no-controls"] if i > 0 else [])])
        res.update(target_unit=target.rel)
        if i == 0:
            e3 = res
        else:
            e3.setdefault("more_targets", {})[target.rel] = {
                k: res[k] for k in ("source", "matrices", "e3", "wall_s", "cpu_s", "target_unit")}
        write_json(e3_path(out), e3)


def first_matches(rel: str, pat: str) -> bool:
    """Whether a --first pattern picks the unit at path `rel`: the pattern matches the path
    (fnmatch) or a folder above it, so `e2/main/moka-r16` picks each of that cell's seeds."""
    return fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel, pat.rstrip("/") + "/*")


def prioritised(pending: list, first=()) -> list:
    """The pending units, those a --first pattern picks (`first_matches`) ahead of the rest,
    each group in the suite's own order: which units a session's hours go to first (e.g. the
    second seed of a comparison a reading hangs on), never which units run."""
    hit = [u for u in pending if any(first_matches(u.rel, pat) for pat in first)]
    return hit + [u for u in pending if u not in hit]


def run_all(p: dict, out: Path, exps, first=()) -> None:
    """Runs every pending unit, one at a time (--first's picks, then E1's power-check units,
    then the suite's order), re-planning after each: a search that finishes chooses an lr, a
    widened grid adds trials, a failed E1 power check holds E1's other main units."""
    told = False
    while True:
        mains = main_set(p, out, exps)
        held = set(capacity_report.held_units(p, out, exps))
        if held and not told:
            told = True
            print(f"[capacity] E1's power check failed (LoRA at {' and '.join(budget_ends(p))}: "
                  f"recall not 20 points apart): its other {len(held)} main units are held; "
                  "resize E1 (protocol e1.pairs / e1.epochs) before running them", flush=True)
        gate = tuple(u.rel for u in power_units(p, out))
        pending = prioritised(prioritised(
            [u for u in all_units(p, out, [e for e in exps if e != "e3"])
             if isinstance(u, Unit) and u not in held and not unit_done(out, u, u in mains)],
            gate), first)
        if not pending:
            if "e3" in exps:
                run_e3(p, out)
            return
        u = pending[0]
        print(f"[capacity] {u.rel} ({len(pending)} runnable units left)", flush=True)
        if u.exp == "e2" and u in mains:
            base_e2(p, out)
        rec = run_unit(p, out, u, full=u in mains)
        score = ", ".join(f"{k} {rec[k]:.4f}" for k in ("select", "heldout_nll", "recall")
                          if rec.get(k) is not None)
        print(f"[capacity] {u.rel}: {score}, {rec['seconds'] / 60:.1f} min", flush=True)


def pilot(p: dict, out: Path, exp: str, methods, budgets, lr: float) -> list:
    rows = []
    phase = (f"pilot-n{p['e1']['pairs']}-e{p['e1']['epochs']}" if exp == "e1"
             else f"pilot-steps{p['e2']['steps']}")  # one directory per sizing tried
    if p.get("lora_scaling", "constant") != "constant":
        phase += f"-{p['lora_scaling']}"
    for m in methods:
        for b in budgets:
            u = Unit(exp, phase, m, b, 0, lr)
            rec = run_unit(p, out, u)
            row = {k: rec.get(k) for k in ("recall", "value_nll", "bits_stored", "val_nll",
                                            "heldout_nll", "params", "seconds")}
            rows.append({"unit": u.rel, **row})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    global PROTOCOL_PATH, SETS, TRAIN_SETS, IN_PROCESS
    args = parse_args(argv)
    PROTOCOL_PATH, SETS = str(Path(args.protocol).absolute()), list(args.set)
    TRAIN_SETS, IN_PROCESS = list(args.train_set), bool(args.in_process)
    p = load_protocol(args.protocol, args.set)
    out = Path(args.out).absolute()
    if args.unit:
        if args.unit == "e2/base":
            evaluate_base(p, out)
        else:
            evaluate_unit(p, out, args.unit, args.full)
        return 0
    exps = args.only or p["experiments"]
    if args.status:
        print(json.dumps(status(p, out, exps, capacity_report.held_units(p, out, exps))))
        return 0
    if args.pilot:
        rows = pilot(p, out, args.pilot, args.methods or ["lora"], args.budgets or ["r1", "r16"],
                     args.lr or p["lrs"][1])
        print(json.dumps({"pilot": rows}))
        return 0
    if not args.report_only:
        units = [u for u in all_units(p, out, [e for e in exps if e != "e3"])
                 if isinstance(u, Unit)]
        for pat in args.first:  # a typo would silently reorder nothing
            if not any(first_matches(u.rel, pat) for u in units):
                raise SystemExit(f"--first {pat!r} matches no unit of {' '.join(exps)}; unit "
                                 f"paths look like {units[0].rel if units else 'e2/main/lora-r4/seed1-lr0.01'}"
                                 " (--status lists those left)")
        run_all(p, out, exps, args.first)
    print(json.dumps(capacity_report.report(p, out, Path(args.results))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
