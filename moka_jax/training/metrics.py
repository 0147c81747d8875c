"""Run metrics: JSONL (always), TensorBoard (tensorboardX), and end-of-run PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moka_jax.support.diskfull import writing


class MetricsWriter:
    """Appends one JSON object per record to out_dir/metrics.jsonl; mirrors scalars to TB.

    keep_through: the step the run (re)starts from (0 = a fresh start). Records of later steps
    (written before a crash, and about to be written again) are cut from metrics.jsonl first,
    and TensorBoard is told to purge them, so no step is ever recorded twice. None appends.
    """

    def __init__(self, out_dir, tensorboard: bool = True, enabled: bool = True,
                 keep_through: int | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / "metrics.jsonl"
        if path.exists() and keep_through is not None:
            cut_metrics(path, keep_through)
        self._file = open(path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            purge = None if keep_through is None else keep_through + 1
            self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=purge)

    def write(self, step: int, **scalars):
        if not self.enabled:
            return
        rec = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
        with writing(self._file.name):
            self._file.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)

    def flush(self):
        if self.enabled:
            self._file.flush()

    def close(self):
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def cut_metrics(path, keep_through: int) -> int:
    """Keep only records with step <= keep_through (atomic rewrite); returns how many were cut.
    A torn last line (a crash mid-write) is dropped too."""
    from moka_jax.support.outputs import write_file_atomic

    kept, cut = [], 0
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
            ok = int(rec["step"]) <= keep_through
        except (ValueError, KeyError, TypeError):
            ok = False
        kept += [line] if ok else []
        cut += 0 if ok else bool(line.strip())
    if cut:
        write_file_atomic(path, "".join(f"{line}\n" for line in kept))
    return cut


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss(records: list[dict], out_png, title: str = "training loss") -> Path:
    """Train (and validation, if logged) loss against step."""
    return plot_losses({"": records}, out_png, title)


def plot_losses(runs: dict[str, list[dict]], out_png, title: str = "training loss") -> Path:
    """Several runs' train (and validation) losses, labelled by run name, in two panels: the
    whole run on a log scale, and the run after its first fifth on a linear scale, with the
    train loss smoothed, where differences of a few thousandths between runs become visible."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (full, tail) = plt.subplots(1, 2, figsize=(11, 4))
    last = max((r["step"] for recs in runs.values() for r in recs), default=0)
    start = last // 5
    shown = []
    for i, (name, records) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            pts = [(r["step"], r[key]) for r in records if key in r]
            if not pts:
                continue
            label = key if not name else name if key == "loss" else f"{name} ({key})"
            full.plot(*zip(*pts), style, color=colour, label=label, alpha=0.8 if key == "loss" else 1)
            x, y = map(np.asarray, zip(*pts))
            y = ema(y, 0.8) if key == "loss" else y
            late = x >= start
            if late.any():
                tail.plot(x[late], y[late], style, color=colour, label=label)
                shown.append(y[late])
    full.set_yscale("log")
    full.set_title(f"{title}: whole run (log scale)")
    tail.set_title(f"after step {start} (train loss smoothed, EMA 0.8)")
    if shown:
        lo, hi = np.percentile(np.concatenate(shown), [1, 99])
        pad = 0.1 * (hi - lo) or 0.01 * abs(hi) or 0.01
        tail.set_ylim(lo - pad, hi + pad)
        tail.legend(fontsize=7)
    for ax in (full, tail):
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3, which="both")
    return _save(fig, plt, out_png)


def _save(fig, plt, out_png) -> Path:
    fig.tight_layout()
    try:
        with writing(out_png, "the plot is redrawn from metrics.jsonl by the next run"):
            fig.savefig(out_png, dpi=120)
    finally:
        plt.close(fig)
    return Path(out_png)


def ema(y, decay: float):
    """Exponential moving average, bias-corrected (as TensorBoard's smoothing)."""
    out, acc = np.empty(len(y)), 0.0
    for i, v in enumerate(np.asarray(y, np.float64)):
        acc = decay * acc + (1 - decay) * v
        out[i] = acc / (1 - decay ** (i + 1))
    return out


def plot_gates(alphas: dict[str, np.ndarray], out_png, title: str = "MoKA gate weights") -> Path:
    """Heatmap: one row per adapted layer, one column per component, colour = alpha_i."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(alphas)
    r = max(len(a) for a in alphas.values())
    grid = np.full((len(names), r), np.nan)
    for i, n in enumerate(names):
        grid[i, : len(alphas[n])] = alphas[n]
    fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.5 * r), max(2.5, 1.2 + 0.22 * len(names))))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xticks(range(r))
    ax.set_xlabel("component i")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="alpha_i = softmax(g)_i")
    return _save(fig, plt, out_png)
