"""One call from a config to a trained adapter: the plan, then the loop.

    summary = train("configs/tiny-debug.yaml", ["train.steps=50"])   # moka_jax.train

The walk of a config, each step downward: config.load_config -> plan.plan_run (every check,
no weights) -> loop.train (moka_jax.load for the base, adapters, steps, the adapter file).
"""

from __future__ import annotations

from pathlib import Path

from moka_jax.config import Config, load_config
from moka_jax.training import loop
from moka_jax.training.plan import plan_run


def train(config, overrides=(), *, quiet: bool = False, max_steps: int | None = None) -> dict:
    """Plan and run (or resume) a training run; returns the loop's summary (run_dir, losses,
    adapter_dir, trainable_params, ..., and "model", the trained model).

    config: a Config, or a YAML path with `overrides` ("train.lr=1e-4", as --set takes them).
    max_steps stops early (as a crash would), for tests.
    """
    if isinstance(config, Config):
        if overrides:
            raise TypeError("train: overrides apply to a YAML path; change a Config with "
                            "dataclasses.replace or config_from_dict")
        cfg = config
    elif isinstance(config, str | Path):
        cfg = load_config(config, list(overrides))
    else:
        raise TypeError(f"train: config is a Config or a YAML path, not {type(config).__name__}")
    plan = plan_run(cfg, quiet=quiet)  # every check before any weight is loaded
    try:
        return loop.train(cfg, plan, max_steps=max_steps, quiet=quiet)
    finally:
        plan.release()  # the run directory's lock


__all__ = ["train"]
