"""Generate text with a base model (and an adapter): `moka-generate`.

    moka-generate --model smollm2 --prompt "What is the capital of France?"

--model: `smollm2` (embedded default), a Hugging Face directory, or a `moka-convert` output.
Temperature 0 is greedy; > 0 samples with nucleus (top-p) filtering and --seed. --beams N > 1
is beam search, step for step transformers' `generate(num_beams=N, do_sample=False)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from moka_jax.cli.errors import guarded
from moka_jax.support.domains import COUNT, NON_NEGATIVE, TOP_P, arg


@guarded("moka-generate", ValueError, FileNotFoundError)
def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="moka-generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 | HF directory | converted directory")
    ap.add_argument("--adapter", default=None, help="adapter directory (moka-jax, orbax or PEFT "
                    "LoRA / DoRA); its base / targets / shapes are checked first")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--max-new-tokens", type=arg(int, COUNT), default=64)
    ap.add_argument("--temperature", type=arg(float, NON_NEGATIVE), default=0.0,
                    help="0 = greedy")
    ap.add_argument("--top-p", type=arg(float, TOP_P), default=1.0)
    ap.add_argument("--beams", type=arg(int, COUNT), default=1,
                    help="beam search with N beams (1 = greedy)")
    ap.add_argument("--seed", type=arg(int, NON_NEGATIVE), default=0)
    ap.add_argument("--quant", default=None, choices=("nf4", "int4", "none"),
                    help="for HF directories (a converted directory keeps its own); default: "
                         "none on CPU (4-bit decode is weight-dequantisation bound there, about "
                         "10x slower per token), nf4 on accelerators")
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    import jax

    from moka_jax.api import load
    from moka_jax.eval.generate import answer

    quant = args.quant or ("none" if jax.default_backend() == "cpu" else "nf4")
    model, tokenizer = load(args.model, args.adapter, quant=quant)  # tokenizer first
    t1 = time.perf_counter()
    # The tokenizer, prompt ids and prompt + max_new_tokens against the model: checked inside,
    # before anything compiles, so a bad prompt is an exit status 2 too.
    answers = answer(model, model.config, tokenizer, args.prompt, chat=not args.no_chat,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, seed=args.seed, num_beams=args.beams)
    t2 = time.perf_counter()
    for prompt, text in zip(args.prompt, answers):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text)
    print(f"[load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s, {Path(args.model).name}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
