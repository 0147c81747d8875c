"""JAX and PyTorch side by side on one config: `python -m moka_jax.cli.compare`.

    python -m moka_jax.cli.compare --config configs/tiny-debug.yaml [--steps 20] [--set k=v ...]

Trains the same model, adapter, batches and AdamW schedule in JAX (the trainer's own step) and
in PyTorch (moka_jax.parity.torch_ref adapters on a transformers LlamaForCausalLM), with
model.quant=none and model.dtype=float32 forced; see moka_jax.parity.compare. The last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from moka_jax.cli.errors import guarded
from moka_jax.support.domains import COUNT, arg


@guarded("moka-compare")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moka_jax.cli.compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML config file (see configs/)")
    ap.add_argument("--steps", type=arg(int, COUNT), default=20)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (model.quant / model.dtype are forced)")
    args = ap.parse_args(argv)
    from moka_jax.config import ConfigError, validate
    from moka_jax.parity.compare import compare, forced_config, format_table

    try:
        cfg = validate(forced_config(args.config, args.overrides, args.steps))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(f"[compare] forcing model.quant=none and model.dtype=float32 (f32 parity, no 4-bit "
          f"rounding); {args.steps} steps of {cfg.adapter.kind} on '{cfg.adapter.targets}'")
    from moka_jax.data import DataError

    try:
        r = compare(cfg, args.steps)
    except (DataError, ValueError, TypeError) as e:  # e.g. DoRA: no torch reference
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(r))
    print(f"max relative loss difference: {r['max_rel_diff']:.2e} (target <= 1e-4); trained dW: "
          f"max relative difference {r['dw_rel_diff']:.2e} (smallest |dW| {r['dw_norm']:.3g})")
    print(f"step time: jax {r['jax_step_s'] * 1e3:.1f} ms, torch {r['torch_step_s'] * 1e3:.1f} ms "
          f"(median, JAX compile steps excluded); torch / jax = "
          f"{r['time_ratio_torch_over_jax']:.2f}")
    summary = {k: v for k, v in r.items() if k not in ("loss_jax", "loss_torch", "rel_diff")}
    summary["config"] = args.config
    print(json.dumps(summary))
    return 0 if math.isfinite(r["max_rel_diff"]) else 1


if __name__ == "__main__":
    sys.exit(main())
