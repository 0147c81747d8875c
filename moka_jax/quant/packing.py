"""Two 4-bit codes per byte along the last axis, the even index in the high nibble.

This is bitsandbytes' order (`packed = q[0::2] << 4 | q[1::2]`), so a row-major (out, in)
weight packed here is byte-for-byte bnb's flattened storage.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def pack_nibbles(codes_RN):
    """(..., n) codes in [0, 15] (uint8) -> (..., n // 2) uint8. numpy or jnp."""
    if codes_RN.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd last dim {codes_RN.shape[-1]}: two codes a byte")
    return (codes_RN[..., 0::2] << 4) | codes_RN[..., 1::2]


def unpack_nibbles(packed_RH, xp=jnp):
    """(..., h) uint8 -> (..., 2h) uint8 codes in [0, 15]. xp: jnp (jit-able) or numpy."""
    hi, lo = packed_RH >> 4, packed_RH & 0xF
    return xp.stack([hi, lo], axis=-1).reshape(*packed_RH.shape[:-1], 2 * packed_RH.shape[-1])


def row_chunks(n_rows: int, n_cols: int, target_elems: int = 1 << 21):
    """Row slices of about target_elems elements each.

    Quantising a chunk at a time bounds the f32 temporaries to a few x 8 MiB whatever the
    tensor size, so a checkpoint can be streamed tensor by tensor on a small host.
    """
    step = max(1, target_elems // max(1, n_cols))
    for r0 in range(0, n_rows, step):
        yield slice(r0, min(n_rows, r0 + step))


def as_f32_rows(w, rows: slice) -> np.ndarray:
    """One row chunk of w as a fresh float32 host array (exact for f16 / bf16 inputs)."""
    return np.asarray(w[rows]).astype(np.float32)
