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


def xla_flops(jitted, args=None) -> float | None:
    """XLA's own count of the floating-point operations of one call of a jitted function (its
    compiled cost analysis), or of an already compiled one (args None); None where the backend
    gives none."""
    try:
        compiled = jitted if args is None else jitted.lower(*args).compile()
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - a backend without cost analysis: no count
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None
