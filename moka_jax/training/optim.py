"""AdamW with warm-up + cosine / linear / constant decay, global-norm clipping, and an optional
learning-rate multiplier for the MoKA gates (train.gate_lr_mult)."""

from __future__ import annotations

import jax
import numpy as np
import optax

# The gate logits' attribute on MoKA / MoKAs (adapters/moka.py: self.g); no other adapter
# parameter has this name.
GATE_NAME = "g"


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


def _key_name(k) -> str | None:
    return getattr(k, "key", getattr(k, "name", None))


def is_gate_path(path) -> bool:
    """A leaf of the adapter tree that is a gate logit vector (.../adapter/g[/value])."""
    names = [_key_name(k) for k in path]
    return any(a == "adapter" and b == GATE_NAME for a, b in zip(names, names[1:]))


def gate_mask(params):
    """Pytree of bools over `params`: True on the gate logits."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_gate_path(p), params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """The optimizer of the adapter tree: clip -> AdamW(schedule) [-> gates x gate_lr_mult].

    The multiplier scales the gates' final AdamW update (decay included), i.e. their lr, as
    LoRA+ scales B's; the clip stays global. At 1.0 the chain is today's optimizer unchanged
    (same update, same state tree, so older checkpoints restore).
    """
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
    parts.append(adamw)
    mult = float(getattr(cfg, "gate_lr_mult", 1.0))
    if mult != 1.0:
        parts.append(optax.masked(optax.scale(mult), gate_mask))
    return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _host(x):
    """A replicated global array's local copy (any process of a multi-host run)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def gate_entropy(params) -> float | None:
    """Mean over gated layers of H(softmax(g)) / log(r): 1 = uniform gates (the init), 0 = one
    component takes all. None when the tree has no gates."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    gates = [np.asarray(_host(leaf), np.float64) for path, leaf in flat if is_gate_path(path)]
    gates = [g for g in gates if g.size > 1]
    if not gates:
        return None
    out = []
    for g in gates:
        p = np.exp(g - g.max())
        p /= p.sum()
        out.append(float(-(p * np.log(np.clip(p, 1e-300, None))).sum() / np.log(g.size)))
    return float(np.mean(out))


__all__ = ["GATE_NAME", "gate_entropy", "gate_mask", "is_gate_path", "lr_schedule",
           "make_optimizer"]
