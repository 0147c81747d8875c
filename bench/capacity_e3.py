"""E3 of issue 21, the mechanism: how well each parameterisation can express a given update.

For every q_proj / v_proj update dW* (one per layer) and budgets equal to LoRA r = 1, 4, 16 on
that weight (r * (m + n) parameters), the best fit of each parameterisation:

    lora        truncated SVD, rank R: the exact optimum
    kron_greedy the MoKA start: one Kronecker product per planner shape
                (plan_moka_shapes(m, n, R, budget=R*(m+n))), each the exact Van Loan-Pitsianis
                best product for what the earlier ones left. At R = 1: the best single product.
    moka        the same mixture refined jointly (kron_fit.moka_from_delta: Adam, --steps, --lr),
                never worse than kron_greedy; at R = 1 the single product is already the
                optimum for an exact split, so it is not refined
    kron1       at every budget's first shape and the others: the best single product of each
                distinct planner shape (exact VLP), target only, under "kron1_by_shape"

reported as relative Frobenius error ||dW* - fit|| / ||dW*|| and the Roy-Vetterli effective rank
of the fit (moka_jax.adapters.fit.effective_rank), mean and sd over all layers and both weights,
against the model's trainable parameters for that parameterisation (30 layers x (q + v)).
Two controls with the target's shapes and per-matrix norms: a Gaussian matrix and a random
rank-8 matrix (a product of two Gaussians).

    python bench/capacity_e3.py --adapter DIR [--model smollm2] --plot e3.png
    python bench/capacity_e3.py --synthetic --plot e3.png      # no adapter: a stand-in target

--adapter reads dW* from a trained adapter directory: LoRA straight from its factors
((alpha / r) B A, no base needed); any other kind through moka_jax.load(model, adapter=DIR)
as merged weight minus the dequantised base. --synthetic draws a stand-in target (random
singular vectors, singular values ~ 1 / i: a decaying spectrum, not a trained update).
The last stdout line is one JSON object {"e3": ..., "controls": {...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

# One BLAS thread: the run is hundreds of small SVDs, and on our shared 2-core machine
# OpenBLAS's threads spin against each other and other jobs (a 576x576 SVD took 1.6 s wall /
# 0.37 s CPU with 2 threads, 0.19 s / 0.03 s with 1, under load ~9). Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

WEIGHTS = ("q_proj", "v_proj")
SMOLLM2_DIMS = {"q_proj": (576, 576), "v_proj": (192, 576)}  # (out, in)
PARAMETERISATIONS = ("lora", "kron_greedy", "moka")
CONTROL_RANK = 8
DEFAULT_STEPS = 50  # measured: 50 Adam steps at lr 3e-3 reach ~95% of what 200 reach
DEFAULT_LR = 3e-3


# ---- targets ----------------------------------------------------------------------------------

def _layer_index(path: str) -> int:
    found = re.search(r"layers/(\d+)/", path)
    if not found:
        raise ValueError(f"adapter layer path {path!r} has no layers/<i>/ component")
    return int(found.group(1))


def read_targets(adapter_dir, model: str = "smollm2", weights=WEIGHTS) -> dict[str, list]:
    """{weight: [dW* (out, in) float64 per layer, in layer order]} of a trained adapter."""
    from moka_jax.io import adapter_io

    meta = adapter_io.read_meta(adapter_dir) if adapter_io.detect_format(adapter_dir) != "peft" \
        else None
    out: dict[str, dict[int, np.ndarray]] = {w: {} for w in weights}
    if meta is not None and meta["adapter"].get("kind") == "lora":
        values = adapter_io.read_values(adapter_dir)
        cfg = meta["adapter"]
        scaling = float(cfg["alpha"]) / int(cfg["r"])
        for key, a in values.items():
            if not key.endswith("/adapter/lora_a"):
                continue
            layer_path = key[: -len("/adapter/lora_a")]
            name = layer_path.rsplit("/", 1)[-1]
            if name in out:
                b = values[layer_path + "/adapter/lora_b"]
                out[name][_layer_index(key)] = scaling * (b.astype(np.float64)
                                                          @ a.astype(np.float64))
    else:  # DoRA, MoKA, MoKAs, PEFT: the effective update, merged minus the dequantised base
        import jax.numpy as jnp

        import moka_jax
        from moka_jax.nn import linear_paths

        net, _ = moka_jax.load(model, adapter=adapter_dir, quant=None, dtype=jnp.float32)
        for path, layer in linear_paths(net):
            name = path.rsplit("/", 1)[-1]
            if layer.adapter is not None and name in out:
                out[name][_layer_index(path + "/")] = (
                    np.asarray(layer.merged_weight(jnp.float32), np.float64)
                    - np.asarray(layer.weight(jnp.float32), np.float64))
    missing = [w for w in weights if not out[w]]
    if missing:
        raise ValueError(f"adapter {adapter_dir} adapts no {missing} layer; E3 needs "
                         f"{list(weights)}")
    return {w: [out[w][i] for i in sorted(out[w])] for w in weights}


def synthetic_targets(layers: int, dims: dict, seed: int = 0) -> dict[str, list]:
    """A stand-in dW* per layer: random orthonormal singular vectors, sigma_i = 1 / i."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (m, n) in dims.items():
        k = min(m, n)
        mats = []
        for _ in range(layers):
            u, _ = np.linalg.qr(rng.normal(size=(m, k)))
            v, _ = np.linalg.qr(rng.normal(size=(n, k)))
            mats.append((u / np.arange(1, k + 1)) @ v.T)
        out[name] = mats
    return out


def control_targets(targets: dict, kind: str, seed: int = 1) -> dict[str, list]:
    """Controls with each target's shape and Frobenius norm: "gaussian" or "lowrank" (rank 8)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, mats in targets.items():
        out[name] = []
        for w in mats:
            m, n = w.shape
            if kind == "gaussian":
                c = rng.normal(size=(m, n))
            elif kind == "lowrank":
                c = rng.normal(size=(m, CONTROL_RANK)) @ rng.normal(size=(CONTROL_RANK, n))
            else:
                raise ValueError(f"control kind {kind!r}: 'gaussian' or 'lowrank'")
            out[name].append(c * (np.linalg.norm(w) / np.linalg.norm(c)))
    return out


# ---- fits ---------------------------------------------------------------------------------------

def budget_shapes(m: int, n: int, rank: int):
    from moka_jax import plan_moka_shapes
    return plan_moka_shapes(m, n, rank, budget=rank * (m + n))


def fit_matrix(w, ranks, *, steps: int, lr: float, by_shape: bool = False) -> dict:
    """{param: {rank: (rel_error, eff_rank, params)}} for one matrix (+ "kron1_by_shape")."""
    from moka_jax.adapters import fit as kron_fit
    from moka_jax.core.shapes import moka_params

    w = np.asarray(w, np.float64)
    m, n = w.shape
    norm = float(np.linalg.norm(w))
    s = np.linalg.svd(w, compute_uv=False)
    out: dict = {p: {} for p in PARAMETERISATIONS}
    for r in ranks:  # the truncated SVD's error and spectrum are the leading singular values
        out["lora"][r] = (float(np.sqrt(np.sum(s[r:] ** 2))) / norm,
                          kron_fit.spectrum_effective_rank(s[:r]), r * (m + n))
    plans = {r: budget_shapes(m, n, r) for r in ranks}
    longest = max(plans.values(), key=len)
    # The planner's shapes for a smaller budget are a prefix of a larger one's, so one greedy
    # run serves every budget; fall back to a run per budget if a plan is not a prefix.
    shared = kron_fit.greedy_kron_start(w, longest)
    for r in ranks:
        shapes = plans[r]
        start = shared[: len(shapes)] if list(longest[: len(shapes)]) == list(shapes) \
            else kron_fit.greedy_kron_start(w, shapes)
        params = sum(moka_params(sh) for sh in shapes)
        greedy = sum(np.kron(a, b)[:m, :n] for a, b in start)
        g_err = float(np.linalg.norm(w - greedy)) / norm
        out["kron_greedy"][r] = (g_err, kron_fit.effective_rank(greedy), params)
        if len(shapes) == 1 or steps == 0:
            out["moka"][r] = out["kron_greedy"][r]
            continue
        factors = kron_fit.moka_from_delta(w, shapes, steps=steps, lr=lr, start=start)
        fit = kron_fit.moka_delta(factors, m, n)
        out["moka"][r] = (float(np.linalg.norm(w - fit)) / norm, kron_fit.effective_rank(fit),
                          params)
    if by_shape:
        out["kron1_by_shape"] = {}
        for sh in dict.fromkeys(longest):
            a, b, rest = kron_fit.kron_svd_fit(w, sh)
            out["kron1_by_shape"][str(sh)] = (rest / norm, moka_params(sh))
    return out


def _mean_sd(xs) -> list[float]:
    xs = np.asarray(xs, np.float64)
    return [float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else 0.0]


def evaluate(targets: dict, ranks, *, steps: int, lr: float, by_shape: bool = False,
             label: str = "") -> dict:
    """{param: {str(rank): {"rel_error", "eff_rank", "params", "by_weight"}}} over all matrices
    of all weights; params = the whole model's (sum over layers and weights)."""
    from moka_jax.adapters import fit as kron_fit

    fits = {}
    for name, mats in targets.items():
        t0 = time.time()
        fits[name] = [fit_matrix(w, ranks, steps=steps, lr=lr, by_shape=by_shape) for w in mats]
        print(f"[e3] {label}{name}: {len(mats)} matrices in {time.time() - t0:.1f} s",
              file=sys.stderr, flush=True)
    out: dict = {}
    for p in PARAMETERISATIONS:
        out[p] = {}
        for r in ranks:
            rows = [(name, f[p][r]) for name, fs in fits.items() for f in fs]
            entry = {"rel_error": _mean_sd([x[0] for _, x in rows]),
                     "eff_rank": _mean_sd([x[1] for _, x in rows]),
                     "params": int(sum(x[2] for _, x in rows)), "by_weight": {}}
            for name, fs in fits.items():
                entry["by_weight"][name] = {
                    "rel_error": _mean_sd([f[p][r][0] for f in fs]),
                    "eff_rank": _mean_sd([f[p][r][1] for f in fs]),
                    "params_per_layer": int(fs[0][p][r][2])}
            out[p][str(r)] = entry
    if by_shape:
        out["kron1_by_shape"] = {
            name: {sh: {"rel_error": _mean_sd([f["kron1_by_shape"][sh][0] for f in fs]),
                        "params_per_layer": fs[0]["kron1_by_shape"][sh][1]}
                   for sh in fs[0]["kron1_by_shape"]}
            for name, fs in fits.items()}
    out["target"] = {name: {"eff_rank": _mean_sd([kron_fit.spectrum_effective_rank(
        np.linalg.svd(w, compute_uv=False)) for w in mats])} for name, mats in targets.items()}
    return out


# ---- plot ---------------------------------------------------------------------------------------

def plot(panels: dict, path, ranks) -> Path:
    """Relative error against trainable parameters (log x), one line per parameterisation,
    one panel per target; error bars: sd over layers and weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), sharey=True,
                             squeeze=False)
    style = {"lora": ("LoRA (truncated SVD)", "o-"),
             "kron_greedy": ("MoKA start (greedy VLP)", "s--"),
             "moka": ("MoKA (refined)", "^-")}
    for ax, (title, res) in zip(axes[0], panels.items()):
        for p, (label, fmt) in style.items():
            xs = [res[p][str(r)]["params"] for r in ranks]
            ys = [res[p][str(r)]["rel_error"][0] for r in ranks]
            sd = [res[p][str(r)]["rel_error"][1] for r in ranks]
            ax.errorbar(xs, ys, yerr=sd, fmt=fmt, label=label, capsize=3, ms=5)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel("trainable parameters (all q/v layers)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative Frobenius error")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- CLI ----------------------------------------------------------------------------------------

def _dims(specs) -> dict:
    out = {}
    for name, spec in zip(WEIGHTS, specs):
        m, n = (int(x) for x in spec.lower().split("x"))
        out[name] = (m, n)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="trained adapter directory (dW* = its update)")
    src.add_argument("--synthetic", action="store_true", help="a stand-in random target")
    ap.add_argument("--model", default="smollm2", help="base for a non-LoRA adapter")
    ap.add_argument("--layers", type=int, default=30, help="--synthetic: layers")
    ap.add_argument("--dims", nargs=2, default=["576x576", "192x576"], metavar="MxN",
                    help="--synthetic: q_proj and v_proj (out x in)")
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 4, 16],
                    help="budgets, as LoRA ranks (R * (m + n) params per weight)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="MoKA refinement steps")
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-controls", action="store_true")
    ap.add_argument("--by-shape", action="store_true",
                    help="also the single best product of each distinct planner shape (target)")
    ap.add_argument("--plot", default=None, help="write the Pareto plot PNG here")
    args = ap.parse_args(argv)
    ranks = sorted(set(args.ranks))
    t0 = time.time()
    cpu0 = time.process_time()
    if args.synthetic:
        targets = synthetic_targets(args.layers, _dims(args.dims), args.seed)
        source = "synthetic (sigma_i = 1/i, random singular vectors)"
    else:
        targets = read_targets(args.adapter, args.model)
        source = str(args.adapter)
    kw = {"steps": args.steps, "lr": args.lr}
    result = {"bench": "capacity_e3", "source": source, "ranks": ranks,
              "matrices": sum(len(v) for v in targets.values()),
              "dims": {k: list(v[0].shape) for k, v in targets.items()},
              "steps": args.steps, "lr": args.lr,
              "e3": evaluate(targets, ranks, by_shape=args.by_shape, label="target ", **kw),
              "controls": {}}
    if not args.no_controls:
        for i, kind in enumerate(("gaussian", "lowrank")):
            result["controls"][kind] = evaluate(control_targets(targets, kind, args.seed + 1 + i),
                                                ranks, label=f"{kind} ", **kw)
    result["wall_s"] = round(time.time() - t0, 1)
    result["cpu_s"] = round(time.process_time() - cpu0, 1)
    if args.plot:
        panels = {"target dW*" if not args.synthetic else "synthetic target": result["e3"]}
        panels.update({f"control: {k}" + (f" (rank {CONTROL_RANK})" if k == "lowrank" else ""): v
                       for k, v in result["controls"].items()})
        result["plot"] = str(plot(panels, args.plot, ranks))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
