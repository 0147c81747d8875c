"""Evaluate a base model, with or without an adapter: `moka-eval` (moka_jax/cli/eval.py).

    python eval.py --model smollm2 --mode choice --limit 50
"""

import sys

from moka_jax.cli.eval import main, parse_args, run  # noqa: F401  (the CLI lives in the package)

if __name__ == "__main__":
    sys.exit(main())
