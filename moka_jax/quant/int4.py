"""Group-wise 4-bit integers along the input axis (groups of `group` weights of one row).

symmetric:  s = absmax / 7,  q = clip(round(w / s), -7, 7),  w' = q * s.
    Codes [-7, 7], not [-8, 7]: with s = absmax / 7 the extreme weight lands exactly on +-7,
    so -8 would never be chosen without clipping; keeping the range symmetric makes the
    quantiser odd (q(-w) = -q(w)) and 0 exact. Stored as the nibble q + 8 (1..15).
asymmetric: the range [min, max] is widened to contain 0, s = (max - min) / 15,
    z = round(-min / s) in [0, 15] (uint8), q = clip(round(w / s) + z, 0, 15), w' = (q - z) * s.
    An integer zero point keeps 0 exact and is the GPTQ / AWQ convention.
Either way |w - w'| <= s / 2 (up to f32 rounding). round() is half-to-even (np.rint).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from moka_jax.quant.packing import as_f32_rows, pack_nibbles, row_chunks, unpack_nibbles

SYM_MAX = 7        # symmetric codes are in [-SYM_MAX, SYM_MAX]
SYM_BIAS = 8       # stored nibble = code + SYM_BIAS
ASYM_LEVELS = 15   # asymmetric codes are in [0, ASYM_LEVELS]


def _safe_div(x, s):
    """x / s with 0 where s == 0 (an all-zero group), without warnings."""
    return np.divide(x, s, out=np.zeros_like(x), where=s > 0)


def quantize_int4(w, group: int, symmetric: bool = True):
    """(out, in) weight -> (packed uint8 (out, in // 2), scales f32 (out, in // group),
    zeros uint8 (out, in // group) or None when symmetric)."""
    n_out, n_in = w.shape
    n_groups = n_in // group
    packed = np.empty((n_out, n_in // 2), np.uint8)
    scales = np.empty((n_out, n_groups), np.float32)
    zeros = None if symmetric else np.empty((n_out, n_groups), np.uint8)
    for rows in row_chunks(n_out, n_in):
        x_RGK = as_f32_rows(w, rows).reshape(-1, n_groups, group)
        if symmetric:
            s_RG = np.abs(x_RGK).max(axis=-1) / np.float32(SYM_MAX)
            q = np.rint(_safe_div(x_RGK, s_RG[..., None]))
            nib = (np.clip(q, -SYM_MAX, SYM_MAX) + SYM_BIAS).astype(np.uint8)
        else:
            lo_RG = np.minimum(x_RGK.min(axis=-1), 0)
            hi_RG = np.maximum(x_RGK.max(axis=-1), 0)
            s_RG = ((hi_RG - lo_RG) / np.float32(ASYM_LEVELS)).astype(np.float32)
            z_RG = np.clip(np.rint(_safe_div(-lo_RG, s_RG)), 0, ASYM_LEVELS)
            q = np.rint(_safe_div(x_RGK, s_RG[..., None])) + z_RG[..., None]
            nib = np.clip(q, 0, ASYM_LEVELS).astype(np.uint8)
            zeros[rows] = z_RG.astype(np.uint8)
        packed[rows] = pack_nibbles(nib.reshape(-1, n_in))
        scales[rows] = s_RG
    return packed, scales, zeros


def dequantize_int4(packed_OH, scales_OG, zeros_OG=None, dtype=jnp.float32):
    """jnp: (nibble - bias or zero point) * scale, in f32 then cast to dtype."""
    n_out, n_groups = scales_OG.shape
    nib_OGK = unpack_nibbles(packed_OH).reshape(n_out, n_groups, -1).astype(jnp.float32)
    zero_OG = (jnp.full_like(scales_OG, SYM_BIAS) if zeros_OG is None
               else zeros_OG.astype(jnp.float32))
    w_OGK = (nib_OGK - zero_OG[..., None]) * scales_OG[..., None]
    return w_OGK.reshape(n_out, -1).astype(dtype)
