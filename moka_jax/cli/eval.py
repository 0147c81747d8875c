"""Evaluate a base model, with or without an exported adapter.

    moka-eval --model smollm2 --mode choice --limit 50            # 8 commonsense tasks
    moka-eval --model smollm2 --adapter runs/x/adapter --mode generate --tasks boolq piqa
    moka-eval --model smollm2 --mode zeroshot --limit 20          # lm-eval-style acc / acc_norm
    moka-eval --model smollm2 --perplexity data/instruct/dolly_open_qa/train.json --limit 200
    moka-eval --model smollm2 --mmlu --shots 5 --limit 10         # 10 val questions / subject

(`python eval.py ...` in a checkout is the same.) --adapter takes a moka-jax adapter
directory, an orbax adapter tree or a PEFT LoRA / DoRA directory.

The prompt is the training template's (the adapter's recorded data.template, else alpaca), in
exactly the tokens training saw up to the response. --template llm-adapters-eval is LLM-Adapters'
commonsense_evaluate.py string instead (for reproducing their protocol; its trailing spaces
tokenise unlike any training prompt). --mode generate: <= 32 new tokens, first regex match of
the task's answer pattern (the share that parses is reported per task), greedy by default;
--beams 4 is LLM-Adapters' setting (beam search as transformers' generate(num_beams=4), about 4x
the decode cost). --mode choice ranks the task's candidate answers by summed token log-prob.
--mode zeroshot asks no instruction: each option's own text is scored after the task's
lm-evaluation-harness prompt ("Question: ...\nAnswer:" ...), acc and length-normalised acc_norm
as lm-eval computes them (eval.zeroshot; --template does not apply).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from moka_jax.cli.errors import guarded
from moka_jax.config import REPO_ROOT as REPO


def parse_args(argv=None):
    from moka_jax.support.domains import COUNT, NON_NEGATIVE, arg
    from moka_jax.eval.commonsense import PROMPT_TEMPLATES, TASKS

    ap = argparse.ArgumentParser(prog="moka-eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2",
                    help="smollm2 | HF directory | converted directory | random")
    ap.add_argument("--quant", default="none", choices=("nf4", "int4", "none"),
                    help="base weights (default none: on CPU 4-bit matmuls are much slower)")
    ap.add_argument("--adapter", default=None, help="adapter directory (moka-jax, orbax or "
                    "PEFT LoRA / DoRA); its base / targets / shapes are checked first")
    ap.add_argument("--mode", default="choice", choices=("choice", "generate", "zeroshot"),
                    help="choice: rank the answer labels after the training prompt; generate: "
                         "decode and parse; zeroshot: lm-eval-style, rank the options' texts")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS),
                    help=f"default: all of {list(TASKS)}")
    ap.add_argument("--data-dir", default=str(REPO / "data" / "commonsense"),
                    help="<dir>/<task>/dev.json (LLM-Adapters format)")
    ap.add_argument("--template", default=None, choices=PROMPT_TEMPLATES,
                    help="prompt template; default: the adapter's training data.template, else "
                         "alpaca. llm-adapters-eval = LLM-Adapters' evaluation string "
                         "(commonsense only)")
    ap.add_argument("--limit", type=arg(int, COUNT), default=None,
                    help="first N records per task / file, or N val questions per MMLU subject")
    ap.add_argument("--batch-size", type=arg(int, COUNT), default=8)
    ap.add_argument("--max-new-tokens", type=arg(int, COUNT), default=32)
    ap.add_argument("--beams", type=arg(int, COUNT), default=1,
                    help="--mode generate: beam search with N beams (default 1 = greedy, fast on "
                         "CPU; LLM-Adapters used 4)")
    ap.add_argument("--seed", type=arg(int, NON_NEGATIVE), default=0, help="adapter init seed before loading "
                    "(irrelevant to results: decoding is deterministic)")
    ap.add_argument("--perplexity", metavar="FILE", default=None,
                    help="perplexity of the responses of an Alpaca-format JSON file instead")
    ap.add_argument("--cutoff-len", type=arg(int, COUNT), default=512, help="perplexity: max tokens")
    ap.add_argument("--mmlu", action="store_true", help="MMLU k-shot accuracy instead")
    ap.add_argument("--mmlu-dir", default=str(REPO / "data" / "mmlu"))
    ap.add_argument("--shots", type=arg(int, NON_NEGATIVE), default=5)
    ap.add_argument("--out", default=None, help="JSON file with every prediction")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = ap.parse_args(argv)
    if args.template is not None and args.mmlu:
        ap.error("--template does not apply to --mmlu (MMLU prompts are plain k-shot text)")
    if args.template == "llm-adapters-eval" and args.perplexity:
        ap.error("--template llm-adapters-eval applies to commonsense evaluation only")
    if args.beams != 1 and (args.mode != "generate" or args.perplexity or args.mmlu):
        ap.error("--beams applies to --mode generate only")
    if args.template is not None and args.mode == "zeroshot" and not (args.perplexity or args.mmlu):
        ap.error("--template does not apply to --mode zeroshot (lm-eval's own task prompts)")
    return args


@guarded("moka-eval", ValueError, FileNotFoundError)
def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    import jax.numpy as jnp

    from moka_jax.api import load
    from moka_jax.eval import commonsense as cs
    from moka_jax.models.source import resolve
    from moka_jax.support.files import check_tokenizer_dir
    from moka_jax.support.outputs import check_output_file, write_file_atomic

    tasks = None
    # Input problems surface before the model is loaded: the output path, then the data.
    if args.out:
        data = args.perplexity or (args.mmlu_dir if args.mmlu else args.data_dir)
        inputs = [data, args.adapter, None if args.model == "smollm2" else args.model]
        check_output_file(args.out, command="eval", inputs=inputs, overwrite=args.overwrite)
    if args.perplexity:
        from moka_jax.data import load_records
        load_records(args.perplexity, "alpaca", args.limit)
    elif not args.mmlu:
        tasks = cs.load_tasks(args.data_dir, args.tasks, args.limit)
        if args.mode == "zeroshot":  # every record parses into lm-eval's fields
            from moka_jax.eval.zeroshot import parse_task
            for t, recs in tasks.items():
                parse_task(t, recs)
    source = resolve(args.model)
    if source.path is not None:
        check_tokenizer_dir(source.path)  # before the weights, not after them
    t0 = time.perf_counter()
    model, tok = load(args.model, args.adapter, quant=args.quant, dtype=jnp.float32,
                      seed=args.seed, progress=True)
    config = model.config
    args.template = args.template or training_template(args.adapter)
    report = run(args, model, config, tok, tasks)
    report.update(model=args.model, quant=args.quant, adapter=args.adapter,
                  seconds=round(time.perf_counter() - t0, 1))
    if args.out:
        write_file_atomic(args.out, json.dumps(report, indent=1))
        print(f"predictions: {args.out}", file=sys.stderr)
    return 0


def training_template(adapter) -> str:
    """The data.template an exported adapter was trained with (alpaca when unrecorded)."""
    from moka_jax.eval.commonsense import DEFAULT_TEMPLATE
    from moka_jax.io.adapter_format import read_adapter_meta

    if adapter is None:
        return DEFAULT_TEMPLATE
    return (read_adapter_meta(adapter).get("data") or {}).get("template", DEFAULT_TEMPLATE)


def run(args, model, config, tok, tasks) -> dict:
    from moka_jax.eval import commonsense as cs

    if args.perplexity:
        from moka_jax.eval.perplexity import perplexity
        r = perplexity(model, tok, args.perplexity, template=args.template or "alpaca",
                       cutoff_len=args.cutoff_len, limit=args.limit, batch_size=args.batch_size)
        print(f"perplexity {r['perplexity']:.4f} (mean NLL {r['nll']:.4f} over {r['tokens']} "
              f"response tokens, {r['examples']} examples)")
        return {"mode": "perplexity", **r}
    if args.mmlu:
        from moka_jax.eval.mmlu import evaluate_mmlu, mmlu_table
        r = evaluate_mmlu(model, tok, args.mmlu_dir, shots=args.shots, limit=args.limit,
                          batch_size=max(1, args.batch_size // 2),
                          max_len=config.max_position_embeddings)
        print(mmlu_table(r))
        return {"mode": "mmlu", **r}
    if args.mode == "zeroshot":
        from moka_jax.eval.zeroshot import evaluate_zeroshot, zeroshot_table
        r = evaluate_zeroshot(model, tok, tasks, batch_size=args.batch_size)
        print(zeroshot_table(r))
        return {"mode": "zeroshot", **r}
    from moka_jax.eval.generate import eos_ids
    template = args.template or cs.DEFAULT_TEMPLATE
    kw = {} if args.mode == "choice" else {"eos_token_ids": eos_ids(config, tok),
                                           "max_new_tokens": args.max_new_tokens,
                                           "num_beams": args.beams}
    results = cs.evaluate_tasks(model, tok, tasks, mode=args.mode, template=template,
                                batch_size=args.batch_size, **kw)
    print(cs.results_table(results))
    beams = {"num_beams": args.beams} if args.mode == "generate" else {}
    return {"mode": args.mode, "template": template, **beams, "average": cs.average(results),
            "tasks": results}


if __name__ == "__main__":
    sys.exit(main())
