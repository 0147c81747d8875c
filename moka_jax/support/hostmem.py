"""Host arrays that reach a device without a transient copy (peak host memory while loading).

    buf = aligned_empty(shape, dtype)   # fill it (a file read, a cast, a transpose), then
    x = to_device(buf)                  # on CPU the jax.Array aliases buf: no copy at all

Measured on jax 0.10.2's CPU client with a 272 MB bf16 array (bench/convert_memory.py):
`jnp.asarray(host)` holds 2 more copies at its peak (3 x the array with the host one, the extra
two appearing asynchronously, after the call returns); `jax.device_put(host)` holds 1 more; and
`jax.device_put` of a 64-byte-aligned C-contiguous host array holds none (the device buffer is
the host buffer, kept alive by the jax.Array). numpy only aligns to 16 bytes, so the loader
allocates its own buffers. Aliasing is only safe for a buffer nobody writes afterwards: these
helpers are for freshly read / cast arrays owned by the caller.
"""

from __future__ import annotations

import jax
import numpy as np

ALIGN = 64  # the XLA CPU client's minimum alignment for aliasing a host buffer


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def host_cast(arr: np.ndarray, dtype, *, transpose: bool = False) -> np.ndarray:
    """arr (or arr.T) in dtype: arr itself when nothing changes, else one aligned copy (the cast
    and the transpose in a single pass, never an intermediate)."""
    dtype = np.dtype(dtype)
    src = arr.T if transpose else arr
    if src.dtype == dtype and src.flags.c_contiguous:
        return src
    out = aligned_empty(src.shape, dtype)
    np.copyto(out, src, casting="unsafe")
    return out


def to_device(arr, device=None):
    """jax.device_put, never jnp.asarray (two transient copies); see the module docstring."""
    return jax.device_put(arr, device)


__all__ = ["ALIGN", "aligned_empty", "host_cast", "to_device"]
