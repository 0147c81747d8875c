"""QLoRA NormalFloat4, bit-compatible with bitsandbytes 0.50.2 (its CPU / default backend).

Quantise (host numpy, row chunks) and dequantise (jnp) one (out, in) weight:
  absmax_b = max |w| over each block of `block_size` along `in`
  code     = number of NF4 midpoints strictly below clip(w * (1 / max(absmax_b, 1e-38)), -1, 1)
  w'       = NF4_CODE[code] * absmax_b
The reciprocal-multiply, the f32 midpoints (a + b) / 2 and the strict `<` are bnb's
(`torch.bucketize(right=False)` on CPU; the CUDA decision tree uses the same midpoints and
strict `>`), so exact ties go to the lower code and an all-zero block gets code 7 (= 0.0;
bnb's CUDA kernel writes code 0 there, which also dequantises to 0).

Double quantisation of absmax (bnb `compress_statistics=True`) is the second half of the file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moka_jax.quant.packing import as_f32_rows, pack_nibbles, row_chunks, unpack_nibbles

# bitsandbytes.functional.get_4bit_type("nf4"), as float32.
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=np.float32)
NF4_CODE.setflags(write=False)
# f32 midpoints computed the way bnb does; they equal the CUDA kernel's decimal constants.
NF4_MIDPOINTS = ((NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)).astype(np.float32)
NF4_MIDPOINTS.setflags(write=False)

# bnb clamps absmax before taking the reciprocal, so an all-zero block maps to 0 * 1e38 = 0.
_ABSMAX_FLOOR = np.float32(1e-38)


def quantize_nf4(w, block_size: int):
    """(out, in) float weight -> (packed uint8 (out, in // 2), absmax f32 (out, in // block_size))."""
    n_out, n_in = w.shape
    packed = np.empty((n_out, n_in // 2), np.uint8)
    absmax = np.empty((n_out, n_in // block_size), np.float32)
    for rows in row_chunks(n_out, n_in):
        x_RBK = as_f32_rows(w, rows).reshape(-1, n_in // block_size, block_size)
        am_RB = np.abs(x_RBK).max(axis=-1)
        inv_RB = np.float32(1) / np.maximum(am_RB, _ABSMAX_FLOOR)
        np.multiply(x_RBK, inv_RB[..., None], out=x_RBK)
        np.clip(x_RBK, -1, 1, out=x_RBK)
        # The rule literally: count the midpoints strictly below (also ~4x faster than searchsorted).
        codes = np.zeros(x_RBK.shape, np.uint8)
        above = np.empty(x_RBK.shape, bool)
        for mid in NF4_MIDPOINTS:
            codes += np.greater(x_RBK, mid, out=above)
        packed[rows] = pack_nibbles(codes.reshape(x_RBK.shape[0], n_in))
        absmax[rows] = am_RB
    return packed, absmax


def quantize_nf4_on_device(w_OI, block_size: int):
    """jnp twin of quantize_nf4 (same rule, bit for bit), for weights made on an accelerator:
    (packed_OH, absmax_OB), no host copy of the full-precision weight."""
    n_out, n_in = w_OI.shape
    x_OBK = w_OI.astype(jnp.float32).reshape(n_out, n_in // block_size, block_size)
    absmax_OB = jnp.abs(x_OBK).max(axis=-1)
    # bnb's 1 / max(absmax, 1e-38). XLA flushes subnormals such as 1e-38 to zero, so the
    # floor's reciprocal is taken on the host (else an all-zero block gets 0 * inf = NaN).
    inv_OB = jnp.where(absmax_OB > 0, jnp.float32(1) / absmax_OB,
                       np.float32(1) / _ABSMAX_FLOOR)
    x_OBK = jnp.clip(x_OBK * inv_OB[..., None], -1, 1)
    codes_OBK = sum((x_OBK > mid).astype(jnp.uint8) for mid in NF4_MIDPOINTS)
    return pack_nibbles(codes_OBK.reshape(n_out, n_in)), absmax_OB


def dequantize_nf4(packed_OH, absmax_OB, dtype=jnp.float32):
    """jnp: table lookup of the unpacked nibbles times the broadcast absmax, in f32 then cast."""
    n_out, n_blocks = absmax_OB.shape
    codes_OI = unpack_nibbles(packed_OH)
    vals_OBK = jnp.asarray(NF4_CODE)[codes_OI].reshape(n_out, n_blocks, -1)
    return (vals_OBK * absmax_OB[..., None]).reshape(codes_OI.shape).astype(dtype)


# ---- double quantisation of absmax: bnb's signed 8-bit dynamic map, blocks of 256 ----

DQ_BLOCK = 256


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32) on CPU.

    torch evaluates start + step * i (first half) and end - step * (steps - 1 - i) (second
    half) in f32 with a fused multiply-add (one rounding). The f64 product of two f32 is
    exact, so f64 evaluation then rounding to f32 reproduces it (bit-equal for every value
    the dynamic map uses; the test compares against bitsandbytes).
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(steps - 1)
    i = np.arange(steps)
    lo = np.float64(step) * i + np.float64(start32)
    hi = -np.float64(step) * (steps - 1 - i) + np.float64(end32)
    return np.where(i < steps // 2, lo, hi).astype(np.float32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
    """bitsandbytes.functional.create_dynamic_map in numpy (float32, sorted, 256 values)."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1

    def means_times(scale, n_items):
        bounds = _linspace_f32(0.1, 1, n_items)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        v = np.float32(scale) * means  # torch casts the Python scalar to the tensor's f32
        return [v, -v] if signed else [v]

    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        data += means_times(10 ** (-(max_exponent_bits - 1) + i), n)
    if additional_items > 0:
        data += means_times(10 ** (-(max_exponent_bits - 1) + i), additional_items + 1)
    data.append(np.array([0.0, 1.0], np.float32))
    values = np.concatenate(data)
    assert values.size == 2 ** total_bits, values.size
    values = np.concatenate([values, np.zeros(256 - values.size, np.float32)])
    return np.sort(values).astype(np.float32)


DYNAMIC_MAP = create_dynamic_map(signed=True)
DYNAMIC_MAP.setflags(write=False)
_LUT_SIZE = 65536


@functools.cache
def _dynamic_lut() -> np.ndarray:
    """bnb's CPU 8-bit quantiser: a 65536-bin grid over [-1, 1], each bin -> nearest code.

    Bin i holds v_i = -1 + 2i / 65535 (f32) and maps to the number of f32 code midpoints
    strictly below v_i. Inputs are rounded to a bin first, so this is nearest-on-a-grid,
    not exact nearest: a value within ~1.5e-5 of a midpoint (or near 0, where codes are
    closer than the grid) can take the neighbouring code. We reproduce that bit for bit.
    """
    mids = (np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])).astype(np.float32)
    v = np.float32(-1) + (np.float32(2) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1)
    return np.searchsorted(mids, v, side="left").astype(np.uint8)


def _dynamic_codes(v: np.ndarray) -> np.ndarray:
    """Normalised f32 values -> uint8 codes, the way bnb's CPU kernel rounds them to a bin."""
    v = np.clip(v, np.float32(-1), np.float32(1))
    t = ((v + np.float32(1)) * np.float32(0.5)) * np.float32(_LUT_SIZE - 1) + np.float32(0.5)
    return _dynamic_lut()[t.astype(np.uint16)]  # truncation, as the C cast does


def double_quantize(absmax_OB: np.ndarray, offset=None):
    """absmax f32 (out, nb) -> (codes uint8 (out, nb), absmax2 f32 (ceil(out*nb / 256),), offset f32 ()).

    offset = mean(absmax). bnb takes torch's f32 cascade sum; we round the f64 mean to f32,
    which is the correctly rounded value and can differ from torch's by one ulp (tests pass
    bnb's offset through `offset` to compare codes exactly).
    """
    if offset is None:
        offset = np.float32(absmax_OB.mean(dtype=np.float64))
    offset = np.float32(offset)
    flat = (absmax_OB.reshape(-1) - offset).astype(np.float32)
    n = flat.size
    n_blocks = -(-n // DQ_BLOCK)
    padded = np.zeros(n_blocks * DQ_BLOCK, np.float32)
    padded[:n] = flat
    blocks = padded.reshape(n_blocks, DQ_BLOCK)  # zero padding never raises a block's max
    absmax2 = np.abs(blocks).max(axis=-1)
    safe = np.where(absmax2 > 0, absmax2, np.float32(1))
    codes = _dynamic_codes(blocks * (np.float32(1) / safe)[:, None])
    codes[absmax2 == 0] = 0  # bnb writes code 0 for an all-zero block (value 0 * absmax2 = 0)
    return codes.reshape(-1)[:n].reshape(absmax_OB.shape), absmax2, np.asarray(offset)


def dequantize_absmax(codes_OB, absmax2, offset):
    """jnp: DYNAMIC_MAP[code] * absmax2 (per 256 flattened codes) + offset, all in f32."""
    n = codes_OB.size
    scale = jnp.repeat(absmax2, DQ_BLOCK, total_repeat_length=absmax2.shape[0] * DQ_BLOCK)[:n]
    vals = _opaque(jnp.asarray(DYNAMIC_MAP)[codes_OB.reshape(-1)] * scale, offset)
    return (vals + offset).reshape(codes_OB.shape)


def _opaque(x, finite):
    """x, but through an integer op the compiler cannot see through.

    Under jit, XLA / LLVM contract `a * b + c` into one FMA (one rounding); bnb rounds the
    product and then the sum. XOR-ing the bits with a runtime zero (`finite` is never NaN)
    keeps the rounded product, so the result stays bit-identical; an optimization_barrier
    does not (XLA drops it before fusion).
    """
    zero = (finite != finite).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.int32) ^ zero, x.dtype)
