"""lm-evaluation-harness with the moka_jax model registered: `moka-lm-eval`.

    moka-lm-eval --model moka_jax --model_args base=smollm2,adapter=runs/x/adapter,quant=nf4 \
        --tasks arc_easy --batch_size 8

The model itself is moka_jax.eval.lm_eval.MokaLM (registered when that module is imported).
"""

from __future__ import annotations

import sys

import moka_jax.eval.lm_eval  # noqa: F401  (registers "moka_jax" in lm-eval's model registry)
from moka_jax.cli.errors import guarded


@guarded("moka-lm-eval")
def main(argv=None) -> int:
    """lm-eval's command line, with the moka_jax model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["moka-lm-eval", *argv]
    else:
        sys.argv[0] = "moka-lm-eval"
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
