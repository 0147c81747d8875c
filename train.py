"""Fine-tune with MoKA / MoKAs / LoRA / DoRA: `moka-train` (moka_jax/cli/train.py).

    python train.py --config configs/tiny-debug.yaml [--set train.steps=50 --set adapter.r=4]
"""

import sys

from moka_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
