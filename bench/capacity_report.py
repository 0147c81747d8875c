"""The report of bench/capacity.py: tables, paired bootstrap intervals, Pareto plots, and the
generated section of RESULTS.md. Reads unit records only (no model), so it runs anywhere."""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

import numpy as np

import capacity_plan as cap
from moka_jax.support.bootstrap import paired_ratio_interval, ratio_interval

BEGIN, END = "<!-- capacity:begin -->", "<!-- capacity:end -->"
# gate_entropy: the gated mixtures' mean over layers of H(softmax(g)) / ln(components) after
# training: 1 = uniform (the init), 0 = one component takes all ("-" for the ungated)
E1_MEASURES = ("recall", "value_nll", "bits_stored", "bits_per_param", "gate_entropy")
E2_MEASURES = ("heldout_nll", "forgetting", "zeroshot_acc", "zeroshot_acc_norm", "gate_entropy")
BOOT = 2000


def records(p: dict, out: Path, exp: str) -> dict:
    """{(method, budget): [record per seed]} of the finished main units (seed order). A
    search winner still waiting for its held-out measures is not finished yet."""
    got: dict = {}
    for u in cap.main_units(p, out, exp):
        if isinstance(u, cap.Unit) and cap.unit_done(out, u, True):
            got.setdefault((u.method, u.budget), []).append(cap.read_result(out, u))
    return got


def _with_derived(out: Path, exp: str, recs: dict) -> None:
    """Adds bits per parameter (E1) and forgetting against the base's general NLL (E2)."""
    base_path = out / "e2" / "base" / "result.json"
    base = json.loads(base_path.read_text()) if exp == "e2" and base_path.exists() else None
    for rs in recs.values():
        for r in rs:
            if exp == "e1":
                r["bits_per_param"] = r["bits_stored"] / r["params"]
            elif base is not None and "general_nll" in r:
                r["forgetting"] = r["general_nll"] - base["general_nll"]


def summarise(recs: dict, measures) -> dict:
    """{method: {budget: {measure: {mean, sd, n}, params}}}."""
    out: dict = {}
    for (m, b), rs in recs.items():
        cell = {"params": rs[0]["params"], "seeds": len(rs)}
        for k in measures:
            v = [r[k] for r in rs if r.get(k) is not None]
            if v:
                cell[k] = {"mean": float(np.mean(v)),
                           "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v)}
        out.setdefault(m, {})[b] = cell
    return out


def _item_stat(rec: dict, exp: str, split: str = "heldout"):
    """(per-item numerator, per-item weight) whose ratio of sums is the unit's measure."""
    if exp == "e1":
        g = np.asarray(rec["items"]["greedy"], float)
        return g, np.ones_like(g)
    it = rec["items"][split]
    return np.asarray(it["nll"], float), np.asarray(it["tokens"], float)


def _same_seeds(a_recs, b_recs):
    """Record pairs of the seeds both cells have finished (E1's pairs differ by seed, so a
    seed pairs only with itself)."""
    b_by_seed = {r["unit"]["seed"]: r for r in b_recs}
    return [(a, b_by_seed[a["unit"]["seed"]]) for a in a_recs if a["unit"]["seed"] in b_by_seed]


def paired_interval(a_recs, b_recs, exp: str, rng, split: str = "heldout"):
    """[estimate, low, high] of measure(a) - measure(b): items resampled within each seed
    (the same items for both methods), seeds averaged; 95% percentile bootstrap."""
    pairs = [(_item_stat(a, exp, split), _item_stat(b, exp, split))
             for a, b in _same_seeds(a_recs, b_recs)]
    return paired_ratio_interval(pairs, n_boot=BOOT, rng=rng)


def single_interval(recs, exp: str, rng):
    """[estimate, low, high] of one cell's measure (items resampled, seeds averaged)."""
    return ratio_interval([_item_stat(r, exp) for r in recs], n_boot=BOOT, rng=rng)


def _rng(key: str) -> np.random.Generator:
    """A bootstrap stream of its own per interval, so an interval moves only when its own
    records do (one shared stream shifted every later interval whenever a unit finished)."""
    return np.random.default_rng(zlib.crc32(key.encode()))


def intervals(p: dict, recs_by_exp: dict) -> dict:
    out = {}
    for exp, recs in recs_by_exp.items():
        for a, b in p["comparisons"]:
            for budget in p["budgets"]:
                ra, rb = recs.get((a, budget)), recs.get((b, budget))
                if not ra or not rb or not _same_seeds(ra, rb):
                    continue
                measure = "recall" if exp == "e1" else "heldout_nll"
                key = f"{exp}:{measure}:{a}-{b}:{budget}"
                out[key] = paired_interval(ra, rb, exp, _rng(key))
    return out


def budget_separates(p: dict, recs: dict) -> tuple[bool | None, dict]:
    """E1's power check: LoRA at the smallest and largest budget differ in recall by >= 20
    points with their 95% intervals apart."""
    lo_b, hi_b = cap.budget_ends(p)
    a, b = recs.get(("lora", lo_b)), recs.get(("lora", hi_b))
    if not a or not b:
        return None, {}
    ia = single_interval(a, "e1", _rng(f"e1:recall:lora-{lo_b}"))
    ib = single_interval(b, "e1", _rng(f"e1:recall:lora-{hi_b}"))
    ok = (ib[0] - ia[0] >= 0.20) and (ib[1] > ia[2])
    return bool(ok), {f"lora-{lo_b}": ia, f"lora-{hi_b}": ib}


def e1_power(p: dict, out: Path) -> bool | None:
    """The power check's verdict once LoRA at both budget ends has every seed; None before."""
    recs = records(p, out, "e1")
    if any(len(recs.get(("lora", b), [])) < len(p["seeds"]) for b in cap.budget_ends(p)):
        return None
    return budget_separates(p, recs)[0]


def held_units(p: dict, out: Path, exps) -> list:
    """E1's main units the driver holds back: all not yet done once the power check has
    failed. The issue's rule is to resize a probe without power before reading it, so no more
    hours go to one (the check's own units are done by then)."""
    if "e1" not in exps or e1_power(p, out) is not False:
        return []
    return [u for u in cap.main_units(p, out, "e1")
            if isinstance(u, cap.Unit) and not cap.unit_done(out, u, True)]


def compute(p: dict, out: Path) -> dict:
    """Where the suite's time went: per experiment and phase, the finished units, their compute
    minutes summed and the median a unit (each unit's processes summed where its record has
    them, `seconds_all`; else its last process alone, so a unit resumed after a stop counts
    low: `lower_bound` says how many); E3's fits from e3.json; the E1 sizing pilots; and how
    many units each machine ran (records before machines were recorded: "not recorded")."""
    exps = [e for e in p["experiments"] if e != "e3"]
    units = [u for u in cap.all_units(p, out, exps) if isinstance(u, cap.Unit)]
    units += cap.e3_targets(p, out) or [] if "e3" in p["experiments"] else []
    recs = [(f"{u.exp} {u.phase}", cap.read_result(out, u)) for u in units]
    recs += [("e1 sizing pilots", json.loads(f.read_text()))
             for f in sorted((out / "e1").glob("pilot*/*/*/result.json"))]
    rows: dict = {}
    machines: dict = {}
    for group, rec in recs:
        if rec is None:
            continue
        g = rows.setdefault(group, {"secs": [], "lower_bound": 0})
        g["secs"].append(cap.unit_seconds(rec))
        g["lower_bound"] += not rec.get("seconds_all_complete", False)
        m = rec.get("machine", "not recorded")
        machines[m] = machines.get(m, 0) + 1
    e3_file = cap.e3_path(out)
    if e3_file.exists():
        fits = cap.e3_fitted(json.loads(e3_file.read_text())).values()
        rows["e3 fits"] = {"secs": [f["wall_s"] for f in fits], "lower_bound": 0}
    table = {k: {"units": len(g["secs"]), "minutes": round(sum(g["secs"]) / 60, 1),
                 "median_minutes": round(float(np.median(g["secs"])) / 60, 1),
                 "lower_bound": g["lower_bound"]} for k, g in rows.items()}
    return {"rows": table, "machines": machines,
            "minutes": round(sum(r["minutes"] for r in table.values()), 1)}


def compute_lines(c: dict) -> list[str]:
    lines = ["", "Compute (minutes of this CPU; a unit's time is its training and measuring; "
             "\"lower bound\": units whose record has only their last process's time, from "
             "before the driver summed a resumed unit's processes):", "",
             "| experiment | units | minutes | median a unit | lower bound |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for k, r in c["rows"].items():
        lines.append(f"| {k} | {r['units']} | {r['minutes']:.1f} | {r['median_minutes']:.1f} | "
                     f"{r['lower_bound']} |")
    lines += [f"| all | {sum(r['units'] for r in c['rows'].values())} | {c['minutes']:.1f} | | "
              f"{sum(r['lower_bound'] for r in c['rows'].values())} |", "",
              "Machines (units each ran): " + "; ".join(
                  f"{m}: {n}" for m, n in sorted(c["machines"].items(), key=lambda x: -x[1]))
              + "."]
    return lines


def method_label(p: dict, method: str) -> str:
    """A method's name with what tells the MoKA variants apart at a glance (a plot's legend):
    its gate ("ungated" or the gate lr multiplier)."""
    spec = p["methods"][method]
    if spec["kind"] not in ("moka", "mokas"):
        return method
    if spec.get("gated", True) is False:
        return f"{method} (no gate)"
    return f"{method} (gate lr x{float(spec.get('gate_lr_mult', 1.0)):g})"


def pareto_plot(summary: dict, measure: str, path: Path, title: str, ylabel: str,
                labels: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, cells in summary.items():
        pts = sorted((c["params"], c[measure]["mean"], c[measure]["sd"])
                     for c in cells.values() if measure in c)
        if not pts:
            continue
        x, y, e = map(np.asarray, zip(*pts))
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=(labels or {}).get(method, method),
                    linestyle="-" if len(pts) > 1 else "none")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (q_proj + v_proj, 30 layers)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(cell: dict, k: str, digits: int = 3) -> str:
    if k not in cell:
        return "-"
    c = cell[k]
    return f"{c['mean']:.{digits}f} ± {c['sd']:.{digits}f}" if c["n"] > 1 else f"{c['mean']:.{digits}f}"


E3_FITS = ("lora", "kron_greedy", "moka")


def _target_label(rel: str) -> str:
    """'e2/e3-target/lora-r64/seed0-lr0.01' -> 'lora-r64'."""
    return rel.split("/")[2]


def e3_panels(e3: dict | None) -> dict:
    """{panel title: capacity_e3 fits} in plot order: the headline target, the further
    targets, the controls."""
    import capacity_e3

    if e3 is None:
        return {}
    panels = {f"dW* of {_target_label(e3['target_unit'])}": e3["e3"]}
    for rel, t in e3.get("more_targets", {}).items():
        panels[f"dW* of {_target_label(rel)}"] = t["e3"]
    for k, v in e3.get("controls", {}).items():
        rank = f" (rank {capacity_e3.CONTROL_RANK})" if k == "lowrank" else ""
        panels[f"control: {k}{rank}"] = v
    return panels


def _errors(res: dict) -> dict:
    """{parameterisation: {budget rank: [mean, sd] relative error}}."""
    return {k: {r: v["rel_error"] for r, v in res[k].items()} for k in E3_FITS}


def e3_summary(e3: dict | None) -> dict:
    """The report JSON's E3 keys: the headline target's errors, the controls', the further
    targets'."""
    if e3 is None:
        return {"e3": {}, "e3_controls": {}, "e3_more_targets": {}}
    return {"e3": _errors(e3["e3"]),
            "e3_controls": {k: _errors(v) for k, v in e3.get("controls", {}).items()},
            "e3_more_targets": {_target_label(rel): _errors(t["e3"])
                                for rel, t in e3.get("more_targets", {}).items()}}


def e3_lines(e3: dict | None, plot: Path | None, where: Path) -> list[str]:
    if e3 is None:
        return []
    panels = e3_panels(e3)
    ranks = list(e3["e3"]["lora"])
    head = "| {} | parameterisation | " + " | ".join(f"R={r}" for r in ranks) + " |"
    rule = "| --- | --- | " + " | ".join("---:" for _ in ranks) + " |"
    lines = ["", f"**E3** (relative Frobenius error of the best fit, mean ± sd over the "
             f"{e3['matrices']} q/v matrices of each target; budgets as LoRA ranks R, "
             f"R (out + in) parameters a matrix):", "", head.format("target"), rule]
    for name, res in panels.items():
        for k in E3_FITS:
            lines.append(f"| {name} | {k} | " + " | ".join(
                "{:.3f} ± {:.3f}".format(*res[k][r]["rel_error"]) for r in ranks) + " |")
    targets = {n: r for n, r in panels.items() if n.startswith("dW*")}
    lines += ["", "Effective rank (Roy-Vetterli, mean ± sd over layers) of each target: " + "; ".join(
        f"{name}: " + ", ".join("{} {:.1f} ± {:.1f}".format(w, *v["eff_rank"])
                                for w, v in res["target"].items())
        for name, res in targets.items()) + ". Of its fits:", "", head.format("target"), rule]
    for name, res in targets.items():
        for k in E3_FITS:
            lines.append(f"| {name} | {k} | " + " | ".join(
                "{:.1f} ± {:.1f}".format(*res[k][r]["eff_rank"]) for r in ranks) + " |")
    if plot is not None:
        lines += ["", f"![e3]({os.path.relpath(plot, where)})"]
    return lines


def markdown(p: dict, summ: dict, ivals: dict, sep, sep_iv, counts, lrs, status, plots,
             where: Path, e3_block: list[str] = (), compute_block: list[str] = ()) -> str:
    """The generated section; image links relative to `where` (the results file's folder)."""
    lines = [BEGIN, "", "### Capacity at matched budgets (`python bench/capacity.py`)", "",
             f"Status: {status['done']} units done, {status['left']} left"
             + (f", {status['held']} held (E1's power check failed: resize E1 before running "
                "them)" if status.get("held") else "")
             + f" ({status['compute_minutes_spent']} min of compute spent). Generated by "
             "`python bench/capacity.py --report-only`.", *compute_block, "",
             "Trainable parameters per method and budget (budget = LoRA rank R on q/v):", "",
             "| method | budget | params | / budget |", "| --- | --- | ---: | ---: |"]
    for r in counts:
        lines.append(f"| {r['method']} | {r['budget']} ({r['budget_params']:,}) | "
                     f"{r['params']:,} | {r['ratio']:.3f} |")
    lines += ["", "Chosen lr (seed 0 at the search budget; validation measure per trial):", "",
              "| exp | method | lr | trials | edge |", "| --- | --- | ---: | --- | --- |"]
    for (exp, m), (lr, scores) in lrs.items():
        if not scores:
            continue
        grid = sorted(scores)
        edge = "yes" if lr in (grid[0], grid[-1]) else ""
        lines.append(f"| {exp} | {m} | {'searching' if lr is None else f'{lr:g}'} | "
                     + ", ".join(f"{k:g}: {v:.4f}" for k, v in sorted(scores.items()))
                     + f" | {edge} |")
    for exp, measures in (("e1", E1_MEASURES), ("e2", E2_MEASURES)):
        s = summ.get(exp) or {}
        if not s:
            continue
        lines += ["", f"**{exp.upper()}** (mean ± sd over seeds; gate_entropy: the gate's "
                  "entropy over ln(components), mean over layers, 1 = uniform, 0 = one component "
                  "takes all):", "",
                  "| method | budget | params | " + " | ".join(measures) + " |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in measures) + " |"]
        for m, cells in s.items():
            for b in p["budgets"]:
                if b in cells:
                    c = cells[b]
                    lines.append(f"| {m} | {b} | {c['params']:,} | "
                                 + " | ".join(_fmt(c, k, 4 if "nll" in k or k == "forgetting"
                                                   else 3) for k in measures) + " |")
    if ivals:
        lines += ["", "Paired bootstrap 95% intervals (first minus second; E1 recall: higher "
                  "is better; E2 held-out NLL: lower is better; the items resampled within "
                  "each seed both cells have, seeds averaged: an interval covers which items "
                  "were measured, not how a training seed moves a cell, which the tables' sd "
                  "shows and two seeds estimate poorly):", "",
                  "| comparison | estimate | 95% interval |", "| --- | ---: | --- |"]
        for k, (e, lo, hi) in ivals.items():
            lines.append(f"| {k} | {e:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")
    if sep is not None:
        lines += ["", f"E1 power check (LoRA r1 vs r16 recall >= 20 points apart, intervals "
                  f"disjoint): **{sep}** {json.dumps(sep_iv)}"]
    for path in plots:
        lines += ["", f"![{path.stem}]({os.path.relpath(path, where)})"]
    lines += [*e3_block, "", END]
    return "\n".join(lines)


def write_section(results: Path, text: str) -> None:
    old = results.read_text() if results.exists() else ""
    if BEGIN in old and END in old:
        new = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, old, flags=re.S)
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    results.write_text(new)


def report(p: dict, out: Path, results: Path) -> dict:
    recs_by_exp, summ = {}, {}
    for exp, measures in (("e1", E1_MEASURES), ("e2", E2_MEASURES)):
        recs = records(p, out, exp)
        _with_derived(out, exp, recs)
        recs_by_exp[exp] = recs
        summ[exp] = summarise(recs, measures)
    ivals = intervals(p, recs_by_exp)
    sep, sep_iv = budget_separates(p, recs_by_exp["e1"])
    lrs = {(exp, m): cap.chosen_lr(p, out, exp, m) for exp in ("e1", "e2")
           for m in cap.searched(p)}
    plots = []
    fig = out / "figures"
    for exp, measure, ylabel in (("e1", "recall", "E1 recall (exact match, greedy)"),
                                 ("e1", "bits_per_param", "E1 bits stored per parameter"),
                                 ("e2", "heldout_nll", "E2 held-out response NLL (nats/token)"),
                                 ("e2", "forgetting", "E2 forgetting (NLL change on Dolly)")):
        if any(measure in c for cells in summ[exp].values() for c in cells.values()):
            plots.append(pareto_plot(summ[exp], measure, fig / f"{exp}_{measure}.png",
                                     f"{exp.upper()}: {measure} vs trainable parameters"
                                     + ("\n(power check failed: not a capacity result)"
                                        if exp == "e1" and sep is False else ""), ylabel,
                                     {m: method_label(p, m) for m in p["methods"]}))
    st = cap.status(p, out, p["experiments"], held_units(p, out, p["experiments"]))
    counts = cap.counts_table(p)
    e3_file = cap.e3_path(out)
    e3 = json.loads(e3_file.read_text()) if e3_file.exists() else None
    e3_plot = None
    if e3 is not None:
        import capacity_e3

        e3_plot = capacity_e3.plot(e3_panels(e3), fig / "e3_rel_error.png",
                                   [int(r) for r in e3["e3"]["lora"]])
    where = results.absolute().parent
    used = compute(p, out)
    write_section(results, markdown(p, summ, ivals, sep, sep_iv, counts, lrs, st, plots,
                                    where, e3_lines(e3, e3_plot, where), compute_lines(used)))

    def compact(s):
        return {m: {b: {k: [v["mean"], v["sd"]] if isinstance(v, dict) else v
                        for k, v in c.items()} for b, c in cells.items()} for m, cells in s.items()}

    return {"e1": compact(summ["e1"]), "e2": compact(summ["e2"]), **e3_summary(e3),
            "e3_note": "done" if e3 else "not run yet",
            "intervals": ivals, "e1_budget_separates": sep,
            "status": {k: v for k, v in st.items() if not k.endswith("_units")},
            "compute": {"minutes": used["minutes"], "machines": used["machines"]}}
