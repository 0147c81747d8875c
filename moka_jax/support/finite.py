"""Values are checked where they enter: a NaN or inf in a weight or adapter tensor is refused,
naming the tensor, instead of flowing into a run or an exported model.

    check_finite(arr, f"{file}: tensor {name}", fix="re-download the model")

Cheap, per tensor as it streams: one float64 sum on the host (finite exactly when every value
is: float64 cannot overflow summing float32 / bf16 / f16 values), one fused reduction on a
device; the exact count is taken only for the error message.
"""

from __future__ import annotations

import numpy as np

from moka_jax.support.trees import CheckpointError


class NonFiniteError(CheckpointError):
    """A tensor holds NaN or inf; the message names it and the fix."""


def _all_finite(arr) -> bool:
    if isinstance(arr, np.ndarray) or np.isscalar(arr):
        a = np.asarray(arr)
        if a.dtype.kind not in "fc" and "float" not in a.dtype.name:
            return True  # integer codes (nf4, int4) and booleans hold no NaN
        return bool(np.isfinite(np.sum(a, dtype=np.complex128 if a.dtype.kind == "c"
                                       else np.float64)))
    import jax.numpy as jnp

    if not jnp.issubdtype(arr.dtype, jnp.inexact):
        return True
    return bool(jnp.all(jnp.isfinite(arr)))


def check_finite(arr, what: str, fix: str = ""):
    """arr unchanged when every value is finite; else NonFiniteError naming `what`."""
    if _all_finite(arr):
        return arr
    a = np.asarray(arr, np.float32) if not isinstance(arr, np.ndarray) or \
        arr.dtype.kind != "f" else arr
    nan, inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
    counts = ", ".join(f"{n} {w}" for n, w in ((nan, "NaN"), (inf, "inf")) if n)
    raise NonFiniteError(f"{what} holds non-finite values ({counts} of {a.size})"
                         + (f"; {fix}" if fix else ""))


__all__ = ["NonFiniteError", "check_finite"]
