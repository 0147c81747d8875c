"""The protocol of bench/capacity.py as data: budgets, methods sized to them, units, their
records and status. No model and no JAX, so the report and --status run anywhere."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "capacity"


# ----------------------------------------------------------------------------- protocol


def load_protocol(path, sets=()) -> dict:
    import yaml

    p = yaml.safe_load(Path(path).read_text())
    for s in sets:
        key, _, value = s.partition("=")
        exp, _, k = key.partition(".")
        if exp not in p or not isinstance(p[exp], dict) or k not in p[exp]:
            raise SystemExit(f"--set {s}: no setting {key!r} in {path}")
        p[exp][k] = yaml.safe_load(value)
    for m, spec in p["methods"].items():
        unknown = set(spec.get("budgets", p["budgets"])) - set(p["budgets"])
        if unknown:
            raise SystemExit(f"{path}: method {m}: unknown budgets {sorted(unknown)}")
        if spec.get("lr_from") and spec["lr_from"] not in p["methods"]:
            raise SystemExit(f"{path}: method {m}: lr_from {spec['lr_from']!r} is no method")
    if p["search_budget"] not in p["budgets"]:
        raise SystemExit(f"{path}: search_budget {p['search_budget']!r} is not a budget")
    return p


def budget_rank(p: dict, budget: str) -> int:
    """A budget's LoRA rank: one of `budgets`, or one of E3's target ranks ('r64')."""
    if budget in p["budgets"]:
        return p["budgets"][budget]
    for r in p.get("e3", {}).get("target_ranks", []):
        if budget == f"r{r}":
            return int(r)
    raise SystemExit(f"budget {budget!r} is not in the protocol's budgets {sorted(p['budgets'])}")


def budget_params(p: dict, budget: str) -> int:
    """LoRA rank R's trainable parameters on the targets: the budget."""
    return budget_rank(p, budget) * p["layers"] * sum(m + n for m, n in p["dims"].values())


def lora_scaling(p: dict, rank: int) -> float:
    """LoRA / DoRA's alpha / r at rank R. 'constant': 2 at every rank (alpha = 2R). 'rslora':
    2 sqrt(R_search / R) (rank-stabilised, Kalajdzievski 2023: alpha proportional to sqrt(R)),
    so the search budget keeps alpha = 2R and its lr carries to the other ranks: with Adam a
    constant alpha / r makes the update of B A grow with R, and the E1 pilots found the lr that
    trains R=1 too hot for R=16 (results/capacity/e1/pilot-n256-e32)."""
    rule = p.get("lora_scaling", "constant")
    if rule == "constant":
        return 2.0
    if rule == "rslora":
        return 2.0 * float(np.sqrt(p["budgets"][p["search_budget"]] / rank))
    raise SystemExit(f"lora_scaling {rule!r}: use 'constant' (alpha = 2R) or 'rslora' "
                     "(alpha / r = 2 sqrt(R_search / R))")


def method_budgets(p: dict, method: str) -> list[str]:
    return list(p["methods"][method].get("budgets", p["budgets"]))


def adapter_section(p: dict, method: str, budget: str) -> tuple[dict, int]:
    """(the adapter section of the unit config, its trainable parameters), sized to the budget
    with the library's planners; the count is checked against the trained model's."""
    import moka_jax as mj
    from moka_jax.core.shapes import moka_params, mokas_params

    spec = {k: v for k, v in p["methods"][method].items()
            if k not in ("budgets", "lr_from", "gate_lr_mult")}
    rank, layers, dims = budget_rank(p, budget), p["layers"], p["dims"]
    kind = spec.pop("kind")
    targets = "(" + "|".join(dims) + ")$"
    if kind in ("lora", "dora"):
        sec = {"kind": kind, "r": rank, "alpha": lora_scaling(p, rank) * rank, **spec}
        per_layer = sum(rank * (m + n) + (m if kind == "dora" else 0) for m, n in dims.values())
    elif kind == "moka":
        table, per_layer = {}, 0
        for m, n in dims.values():
            shapes = mj.plan_moka_shapes(m, n, rank, budget=rank * (m + n))
            table[f"{m}x{n}"] = [[list(a), list(b)] for a, b in shapes]
            per_layer += sum(moka_params(s) for s in shapes) + (rank if spec.get("gated", True)
                                                                  else 0)
        sec = {"kind": "moka", "r": rank, "shapes": table, **spec}
    elif kind == "mokas":
        r = int(spec.pop("r"))
        target = budget_params(p, budget) / layers

        def cost(b):  # non-decreasing in b: a larger cap only admits larger primes
            try:
                return sum(sum(mokas_params(m, n, q) for q in mj.plan_mokas_primes(m, n, r, b))
                           + r for m, n in dims.values())
            except ValueError:
                return 0
        lo, hi = 1, int(3 * target)  # bisect for the first per-layer budget reaching target
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if cost(mid) < target else (lo, mid)
        best = min((lo - 1, lo), key=lambda b: abs(cost(b) - target))
        sec = {"kind": "mokas", "r": r, "budget": best, **spec}
        per_layer = cost(best)
    else:
        raise SystemExit(f"method {method}: unknown kind {kind!r}")
    sec["targets"] = targets
    return sec, per_layer * layers


def counts_table(p: dict) -> list[dict]:
    rows = []
    for m in p["methods"]:
        for b in method_budgets(p, m):
            _, n = adapter_section(p, m, b)
            rows.append({"method": m, "budget": b, "budget_params": budget_params(p, b),
                         "params": n, "ratio": n / budget_params(p, b)})
    return rows


# ----------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    exp: str
    phase: str      # search | main | pilot
    method: str
    budget: str
    seed: int
    lr: float

    @property
    def rel(self) -> str:
        return f"{self.exp}/{self.phase}/{self.method}-{self.budget}/seed{self.seed}-lr{self.lr:g}"


def searched(p: dict) -> list[str]:
    """The methods with an lr search of their own (the others take one's by lr_from)."""
    return [m for m, spec in p["methods"].items() if not spec.get("lr_from")]


def search_units(p: dict, exp: str, out: Path | None = None) -> list[Unit]:
    """The search trials: every searched method at every lr of `search_lrs` (the grid as
    widened by the records under `out`; the protocol's own grid without it)."""
    return [Unit(exp, "search", m, p["search_budget"], 0, lr)
            for m in searched(p) for lr in search_lrs(p, exp, out)]


def search_lrs(p: dict, exp: str, out: Path | None = None) -> list[float]:
    """The experiment's lr grid. It starts from the experiment's own `lrs` (a grid widened by
    hand) or the protocol's; once every trial of it has a record under `out`, a method whose
    winner sits at an edge widens it by the next value beyond that edge (`next_lr`), for every
    searched method alike (the issue's rule: a winner at a grid edge widens the grid), at most
    the protocol's `widen` values a side; a winner still at an edge after that is flagged by
    the report. Main units wait for the widened trials (chosen_lr)."""
    return _search_grid(p, exp, out)[0]


def _search_grid(p: dict, exp: str, out: Path | None) -> tuple[list[float], bool]:
    """(the grid so far, whether it is final: every trial recorded and no edge to widen)."""
    grid = [float(x) for x in p[exp].get("lrs", p["lrs"])]
    if out is None:
        return grid, False
    added = {1: 0, 0: 0}  # values added above / below
    while True:
        winners = set()
        for m in searched(p):
            scores = _trial_scores(p, out, exp, m, grid)
            if scores is None:
                return grid, False
            winners.add(min(scores, key=scores.get))
        grew = False
        for up, edge in ((1, grid[-1]), (0, grid[0])):
            if edge in winners and len(grid) > 1 and added[up] < p.get("widen", 0):
                grid = grid + [next_lr(edge, up=True)] if up else [next_lr(edge, up=False)] + grid
                added[up] += 1
                grew = True
        if not grew:
            return grid, True


def next_lr(lr: float, up: bool) -> float:
    """The next value beyond `lr` on the 1-3-10 half-decade grid the protocol's lrs use
    (1e-2 -> 3e-2 -> 1e-1 up, 1e-3 -> 3e-4 down); off-grid values step to the nearest grid
    value beyond them."""
    e = math.floor(math.log10(lr) + 1e-9)
    m = round(lr / 10 ** e, 6)  # mantissa in [1, 10)
    if up:
        nxt = 3 * 10 ** e if m < 3 else 10 ** (e + 1)
    else:
        nxt = 3 * 10 ** e if m > 3 else (10 ** e if m > 1 else 3 * 10 ** (e - 1))
    return float(f"{nxt:.6g}")


def _trial_scores(p: dict, out: Path, exp: str, method: str, grid) -> dict | None:
    """{lr: validation score} of the method's trials on the grid; None while one is missing."""
    recs = [read_result(out, Unit(exp, "search", method, p["search_budget"], 0, lr))
            for lr in grid]
    return None if None in recs else {lr: r["select"] for lr, r in zip(grid, recs)}


def chosen_lr(p: dict, out: Path, exp: str, method: str) -> tuple[float | None, dict]:
    """The search winner of the method (or of its lr_from) on the final grid, with every
    finished trial's score; None while the grid may still change (a trial of any searched
    method missing, or a widened one not run yet)."""
    src = p["methods"][method].get("lr_from") or method
    grid, final = _search_grid(p, exp, out)
    recs = {lr: read_result(out, Unit(exp, "search", src, p["search_budget"], 0, lr))
            for lr in grid}
    scores = {lr: r["select"] for lr, r in recs.items() if r is not None}
    return (min(scores, key=scores.get) if final else None), scores


def main_units(p: dict, out: Path, exp: str) -> list[Unit | tuple]:
    """Seed-major main units; a method whose lr is not chosen yet appears as (method, budget,
    seed) so --status can count it."""
    units = []
    for seed in p["seeds"]:
        for m in p["methods"]:
            lr, _ = chosen_lr(p, out, exp, m)
            for b in method_budgets(p, m):
                if lr is None:
                    units.append((exp, m, b, seed))
                elif b == p["search_budget"] and seed == 0 and not p["methods"][m].get("lr_from"):
                    units.append(Unit(exp, "search", m, b, 0, lr))  # the search run itself
                else:
                    units.append(Unit(exp, "main", m, b, seed, lr))
    return units


def budget_ends(p: dict) -> tuple[str, str]:
    """The smallest and the largest budget: E1's power check compares LoRA at these two."""
    return min(p["budgets"], key=p["budgets"].get), max(p["budgets"], key=p["budgets"].get)


def power_units(p: dict, out: Path) -> list[Unit]:
    """E1's power-check units: LoRA at both budget ends, every seed (none before LoRA's E1 lr
    is chosen). The driver runs them before E1's other main units."""
    ends = budget_ends(p)
    return [u for u in main_units(p, out, "e1")
            if isinstance(u, Unit) and u.method == "lora" and u.budget in ends]


def main_set(p: dict, out: Path, exps) -> set:
    """The units whose every measure the report reads (main units, search winners included)."""
    return {u for e in exps if e != "e3" for u in main_units(p, out, e) if isinstance(u, Unit)}


def unit_done(out: Path, u: Unit, main: bool) -> bool:
    """Trained and measured as far as it is needed: a main unit (a search winner too) needs
    every measure, a search trial its validation measure."""
    rec = read_result(out, u)
    return rec is not None and (not main or rec.get("measured", "all") == "all")


def read_result(out: Path, u: Unit) -> dict | None:
    path = out / u.rel / "result.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=False))
    os.replace(tmp, path)


def all_units(p: dict, out: Path, exps) -> list:
    units = []
    for exp in exps:
        units += search_units(p, exp, out)
        units += [u for u in main_units(p, out, exp) if u not in units]
    return units


def e3_targets(p: dict, out: Path) -> "list[Unit] | None":
    """E3's high-capacity updates: LoRA at each of e3.target_ranks trained as an E2 unit (E2's
    data, steps and LoRA's chosen E2 lr, seed 0), the headline first; None until that lr is
    chosen."""
    lr, _ = chosen_lr(p, out, "e2", "lora")
    return None if lr is None else [Unit("e2", "e3-target", "lora", f"r{r}", 0, lr)
                                    for r in p["e3"]["target_ranks"]]


def e3_fitted(e3: dict) -> dict:
    """{target unit: its fits' record} of an e3.json: the headline (the top level) and any
    further targets ("more_targets")."""
    return {e3["target_unit"]: e3, **e3.get("more_targets", {})}


def unit_seconds(rec: dict) -> float:
    """A unit's compute time: every process that trained it where its record sums them
    (`seconds_all`), else its last process's (records from before that was kept)."""
    return rec.get("seconds_all", rec["seconds"])


def e3_path(out: Path) -> Path:
    return out / "e3" / "e3.json"


def status(p: dict, out: Path, exps, held=()) -> dict:
    """Units done and left, compute spent and left; `held`: units the driver will not run
    (E1's main units after a failed power check), listed apart and not counted as left."""
    done, left, secs, held_rels = [], [], [], []
    if "e3" in exps:
        targets = e3_targets(p, out)
        e3 = json.loads(e3_path(out).read_text()) if e3_path(out).exists() else None
        for t in targets or [None]:
            if t is None or read_result(out, t) is None:
                left.append(t.rel if t else "e2/e3-target/lora (E2's LoRA lr not chosen)")
            else:
                done.append(t.rel)
                secs.append(unit_seconds(read_result(out, t)))
            fits = f"e3/fits/{t.budget if t else 'lora'}"
            fitted = e3_fitted(e3) if e3 is not None else {}
            if t is not None and t.rel in fitted:
                done.append(fits)
                secs.append(fitted[t.rel]["wall_s"])
            else:
                left.append(fits)
    mains = main_set(p, out, exps)
    for u in all_units(p, out, [e for e in exps if e != "e3"]):
        rec = read_result(out, u) if isinstance(u, Unit) else None
        if u in held:
            held_rels.append(u.rel)
        elif rec is None or not unit_done(out, u, u in mains):
            left.append(u.rel if isinstance(u, Unit) else "/".join(map(str, u)) + " (lr not chosen)")
        else:
            done.append(u.rel)
            secs.append(unit_seconds(rec))
    return {"done": len(done), "left": len(left), "left_units": left,
            "held": len(held_rels), "held_units": held_rels,
            "compute_minutes_spent": round(sum(secs) / 60, 1),
            "compute_minutes_left_est": _left_estimate(done, secs, left)}


def _left_estimate(done: list, secs: list, left: list) -> float | None:
    """Minutes the units left would take at the median pace of the finished units of their
    experiment (all finished units' median where an experiment has none yet). A median, not a
    mean: a unit that shared the machine with a test run took several times a quiet one."""
    if not secs:
        return None
    def exp(rel):
        return rel.split("/")[0]

    by_exp: dict = {}
    for rel, s in zip(done, secs):
        by_exp.setdefault(exp(rel), []).append(s)
    pace = {e: float(np.median(v)) for e, v in by_exp.items()}
    overall = float(np.median(secs))
    return round(sum(pace.get(exp(rel), overall) for rel in left) / 60, 1)


