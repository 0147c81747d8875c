"""The divergence guard: which step metrics stop a run, and the hint each stop gives.

A run stops when the loss or the gradient norm is not finite, or when the gradient norm passes
EXPLODING (far beyond any clipped, healthy step; a step this large destroys the adapter). The
hint comes from the state that explains the stop: at lr 0 (warm-up's first step) or at the
first step of a fresh run no update has happened yet, so the cause is the base, the data or
adapter.scale, never the lr. A gradient norm of exactly zero for ZERO_STEPS steps in a row
warns once: the adapters learn nothing.
"""

from __future__ import annotations

import math

EXPLODING = 1e10
ZERO_STEPS = 10


def divergence(step: int, loss: float, grad_norm: float, lr, *,
               updates_before: int) -> str | None:
    """The reason to stop at `step` (1-based), or None. updates_before: optimizer updates
    with a non-zero lr applied before this step's forward pass. lr: the step's lr, or a
    callable giving it (read only when the run stops)."""
    if math.isfinite(loss) and math.isfinite(grad_norm) and grad_norm <= EXPLODING:
        return None
    lr = lr() if callable(lr) else lr
    what = (f"loss is {loss}" if not math.isfinite(loss) else
            f"gradient norm is {grad_norm}" if not math.isfinite(grad_norm) else
            f"gradient norm is {grad_norm:.3g} (> {EXPLODING:.0e})")
    if updates_before == 0:
        hint = ("no update has been applied yet, so the lr is not the cause: check the base "
                "weights for NaN / inf, the data, and adapter.scale")
    else:
        hint = (f"the lr at this step is {lr:.3g}: lower train.lr, raise train.warmup_steps "
                "or set train.grad_clip")
    return f"{what} at step {step}; {hint}"


class ZeroGradWatch:
    """Warns once when the gradient norm has been exactly 0 for ZERO_STEPS steps in a row."""

    def __init__(self, warn=print):
        self.run, self.warned, self.warn = 0, False, warn

    def __call__(self, step: int, grad_norm: float, lr) -> None:
        """lr: the step's lr, or a callable giving it (read only to warn)."""
        self.run = self.run + 1 if grad_norm == 0.0 else 0
        if self.run >= ZERO_STEPS and not self.warned:
            self.warned = True
            lr = lr() if callable(lr) else lr
            self.warn(f"[moka_jax] warning: the gradient norm has been 0 for {self.run} steps "
                      f"(up to step {step}, lr {lr:.3g}): the adapters learn nothing. Check that "
                      "the data has labelled tokens and that train.lr and adapter.scale are not "
                      "so large that the adapter saturated")
