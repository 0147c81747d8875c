"""One timer for the benches: median wall time of a jitted call after its compile."""

from __future__ import annotations

import statistics
import time


def median_seconds(fn, args, repeats: int, warmups: int = 1) -> float:
    """Median of `repeats` calls of fn(*args), blocked until ready, after `warmups` calls (the
    first compiles)."""
    import jax

    for _ in range(warmups):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
