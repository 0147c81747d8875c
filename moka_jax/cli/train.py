"""Fine-tune a (4-bit) LLaMA-family model with MoKA / MoKAs / LoRA / DoRA.

    moka-train --config configs/tiny-debug.yaml [--set train.steps=50 --set adapter.r=4]
"""

import argparse
import sys

from moka_jax.cli.errors import guarded
from moka_jax.config import ConfigError, load_config


@guarded("moka-train")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moka-train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML config file (see configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    # Heavy imports only after the config is valid. The plan checks everything a run needs
    # before any weight is loaded; an input problem found then, or later, exits with 2, and
    # a fault (signal, full disk, divergence) with one line (cli.errors).
    from moka_jax.training.run import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
