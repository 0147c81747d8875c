"""Do MoKA's gates learn? Gate lr multiplier sweep (train.gate_lr_mult) on SmolLM2 (nf4, r=4).

With B = 0 at init the gate gradient is zero at step 0, and at the shared lr the gates hardly
leave 1/r (RESULTS.md, 40 steps: alpha in [0.245, 0.257]). This trains configs/experiments/
moka.yaml once per multiplier, the same data order and steps, and records per run the gate
entropy trajectory (mean over layers of H(alpha) / log r; 1 = uniform), the validation loss on
the split carved from the training data (data.val_size, never a dev set), the final alpha
range and the train loss. The multiplier with the lowest final validation loss is reported
as `best_by_val_loss`; the gates' movement is reported beside it, so a multiplier that only
moves the gates without helping the loss is visible as such.

    python bench/gate_lr_sweep.py                          # 1 / 10 / 100 x 60 steps, SmolLM2
    python bench/gate_lr_sweep.py --mults 1 30 300 --steps 100
    python bench/gate_lr_sweep.py --tiny                    # the random tiny model, seconds

Each multiplier's run directory is <out>/mult-<k>; a finished one is reused (the trainer's
checkpoint guard refuses other settings there, never deleting them). Last stdout line: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tinymode import TINY_OVERRIDES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "experiments" / "moka.yaml"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mults", nargs="+", type=float, default=[1.0, 10.0, 100.0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3, help="the shared lr (the others' lr)")
    ap.add_argument("--eval-every", type=int, default=20, help="validation loss every N steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (after --tiny's)")
    ap.add_argument("--tiny", action="store_true", help="the random tiny model (smoke test)")
    ap.add_argument("--out", default=str(REPO / "runs" / "gate_lr_sweep"))
    args = ap.parse_args(argv)
    if any(m <= 0 for m in args.mults) or args.steps < 1 or args.eval_every < 1:
        ap.error("--mults must be > 0, --steps and --eval-every >= 1")
    return args


def run_config(args, mult: float):
    from moka_jax.config import load_config

    sets = [*(TINY_OVERRIDES if args.tiny else []),
            f"train.steps={args.steps}", f"train.lr={args.lr}", f"train.gate_lr_mult={mult}",
            f"train.eval_every={args.eval_every}", "train.log_every=1",
            f"train.warmup_steps={max(1, args.steps // 10)}", "train.save_every=0",
            *args.set, f"train.out_dir={Path(args.out).absolute() / f'mult-{mult:g}'}"]
    cfg = load_config(CONFIG, sets)
    if cfg.adapter.kind not in ("moka", "mokas") or not cfg.adapter.config.gated:
        raise SystemExit(f"{CONFIG}: the sweep needs a gated MoKA / MoKAs adapter")
    if not cfg.data.val_size:
        raise SystemExit("data.val_size is 0: the sweep scores on a validation split carved "
                         "from the training data; set data.val_size")
    return cfg


def summarize(records: list[dict], gates: dict) -> dict:
    alphas = [a for v in gates.values() for a in v]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return {"gate_entropy": [(r["step"], r["gate_entropy"]) for r in records
                             if "gate_entropy" in r],
            "val_loss": val, "final_val_loss": val[-1][1] if val else None,
            "final_train_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None),
            "alpha_min": min(alphas), "alpha_max": max(alphas)}


def main(argv=None):
    args = parse_args(argv)
    import moka_jax as mj
    from moka_jax.training.metrics import read_metrics

    configs = {m: run_config(args, m) for m in args.mults}  # all parse before any training
    runs, t0 = {}, time.perf_counter()
    for mult, cfg in configs.items():
        t = time.perf_counter()
        summary = mj.train(cfg, quiet=True)
        run_dir = Path(summary["run_dir"])
        rec = summarize(read_metrics(run_dir / "metrics.jsonl"),
                        json.loads((run_dir / "gates.json").read_text()))
        rec.update(seconds=round(time.perf_counter() - t, 1), run_dir=str(run_dir))
        runs[f"{mult:g}"] = rec
        ent = rec["gate_entropy"][-1][1]
        print(f"[gate_lr_sweep] mult {mult:g}: val loss {rec['final_val_loss']:.4f}, gate "
              f"entropy {ent:.4f}, alpha in [{rec['alpha_min']:.3f}, {rec['alpha_max']:.3f}]",
              flush=True)
    best = min(runs, key=lambda k: runs[k]["final_val_loss"])
    print(json.dumps({"bench": "gate_lr_sweep", "model": "tiny" if args.tiny else
                      configs[args.mults[0]].model.path, "steps": args.steps, "lr": args.lr,
                      "best_by_val_loss": float(best), "runs": runs,
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
