"""AdamW with warm-up + cosine / linear / constant decay and global-norm clipping."""

from __future__ import annotations

import optax


def lr_schedule(cfg) -> optax.Schedule:
    """cfg: TrainConfig (lr, warmup_steps, schedule, steps, min_lr_ratio)."""
    warmup = max(int(cfg.warmup_steps), 0)
    decay_steps = max(int(cfg.steps) - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"train.schedule: unknown schedule {cfg.schedule!r}; "
                         "choose cosine, linear or constant")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optimizer of the adapter tree: clip -> AdamW(schedule). State stays in f32."""
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.grad_clip:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
