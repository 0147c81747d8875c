"""QuantizedWeight: a frozen 4-bit (out, in) weight as a pytree; quantize / dequantize / matmul."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moka_jax.quant import int4, nf4

QUANT_KINDS = ("nf4", "int4")
# Floats we quantise. Integers, bools, complex and fp8 are rejected: there is no weight to scale.
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _static(**kw):
    return struct.field(pytree_node=False, **kw)


@struct.dataclass
class QuantizedWeight:
    """A 4-bit (out, in) weight. Every array is stored along the un-flattened `out` axis first,
    so a sharding spec on `out` applies to `packed`, `scales` and `zeros` alike.

    packed   uint8 (out, in // 2): two codes a byte, even column in the high nibble.
    scales   nf4: f32 absmax (out, in // block_size), or its uint8 codes when double_quant;
             int4: f32 step size (out, in // block_size).
    zeros    int4 asymmetric: uint8 zero points (out, in // block_size); else None.
    scales2  nf4 double_quant: f32 absmax of the centred absmax, per 256 flattened codes.
    offset   nf4 double_quant: f32 mean of absmax, shape ().
    """

    packed: jax.Array
    scales: jax.Array
    kind: str = _static()
    shape: tuple[int, int] = _static()
    block_size: int = _static()
    orig_dtype: str = _static()
    zeros: jax.Array | None = None
    scales2: jax.Array | None = None
    offset: jax.Array | None = None
    double_quant: bool = _static(default=False)
    symmetric: bool = _static(default=True)

    @property
    def nbytes(self) -> int:
        """Bytes of all array leaves (works on tracers too)."""
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(self))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return dequantize(self, dtype)


def _fail(name: str, msg: str):
    raise ValueError(f"quantize: layer '{name or '<unnamed>'}': {msg}")


def _largest_divisor_upto(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _check(w, kind, block_size, double_quant, name):
    """Reject what cannot be quantised, naming the layer, the value and the rule."""
    if kind not in QUANT_KINDS:
        _fail(name, f"unknown kind {kind!r}; choose one of {QUANT_KINDS}")
    dtype = np.dtype(w.dtype)
    if dtype.name not in _FLOAT_DTYPES:
        _fail(name, f"dtype {dtype.name} cannot be quantised; the weight must be one of "
                    f"{_FLOAT_DTYPES}")
    if len(w.shape) != 2:
        _fail(name, f"weight shape {tuple(w.shape)} is not 2-D (out, in)")
    n_out, n_in = w.shape
    if n_out == 0 or n_in == 0:
        _fail(name, f"weight shape {tuple(w.shape)} is empty")
    if n_in % 2:
        _fail(name, f"in dim {n_in} is odd; two 4-bit codes are packed per byte along `in`")
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size <= 0:
        _fail(name, f"block_size {block_size!r} must be a positive int")
    if n_in % block_size:
        what = "block_size" if kind == "nf4" else "group size (block_size)"
        _fail(name, f"in dim {n_in} is not a multiple of {what} {block_size}; blocks run along "
                    f"`in` so storage stays (out, ...); try block_size="
                    f"{_largest_divisor_upto(n_in, block_size)}")
    if double_quant and kind != "nf4":
        _fail(name, f"double_quant=True applies to nf4 only, not {kind!r}")


def quantize(w, kind: str = "nf4", *, block_size: int = 64, double_quant: bool = False,
             symmetric: bool = True, name: str = "") -> QuantizedWeight:
    """Quantise a (out, in) weight (PyTorch layout; numpy or jax; f32 / f16 / bf16).

    Runs on the host in numpy, a chunk of rows at a time, then places the small 4-bit leaves
    with jnp.asarray (default device; re-place them with jax.device_put for a sharding).
    """
    if not hasattr(w, "shape") or not hasattr(w, "dtype"):
        w = np.asarray(w)
    _check(w, kind, block_size, double_quant, name)
    w = np.asarray(w)  # host view / copy in the original dtype, never an f32 copy
    zeros = scales2 = offset = None
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported below
        if kind == "nf4":
            packed, scales = nf4.quantize_nf4(w, block_size)
        else:
            packed, scales, zeros = int4.quantize_int4(w, block_size, symmetric)
    bad = ~np.isfinite(scales)  # NaN / Inf anywhere in a block propagates into its scale
    if bad.any():
        row, blk = np.argwhere(bad)[0]
        _fail(name, f"weight has NaN or Inf (first in row {row}, columns "
                    f"{blk * block_size}..{(blk + 1) * block_size - 1}); only finite weights "
                    f"can be quantised")
    if double_quant:
        scales, scales2, offset = nf4.double_quantize(scales)
    leaves = [None if a is None else jnp.asarray(a) for a in (packed, scales, zeros, scales2, offset)]
    return QuantizedWeight(
        *leaves[:2], kind=kind, shape=tuple(int(d) for d in w.shape), block_size=int(block_size),
        orig_dtype=np.dtype(w.dtype).name, zeros=leaves[2], scales2=leaves[3], offset=leaves[4],
        double_quant=bool(double_quant), symmetric=bool(symmetric) if kind == "int4" else True)


@partial(jax.jit, static_argnames="dtype")
def dequantize(q: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The (out, in) weight in `dtype`; computed in f32 (as bitsandbytes does), then cast."""
    if q.kind == "nf4":
        absmax = (nf4.dequantize_absmax(q.scales, q.scales2, q.offset) if q.double_quant
                  else q.scales)
        return nf4.dequantize_nf4(q.packed, absmax, dtype)
    if q.kind == "int4":
        return int4.dequantize_int4(q.packed, q.scales, q.zeros, dtype)
    raise ValueError(f"unknown QuantizedWeight kind {q.kind!r}")


@partial(jax.jit, static_argnames="dtype")
def quant_matmul(x, q: QuantizedWeight, dtype=None) -> jax.Array:
    """x @ W.T for x (..., in) -> (..., out); W is dequantised inside this computation.

    dtype: compute dtype (default x.dtype). Products accumulate in f32. The backward (dx only:
    the weight is frozen) dequantises W again instead of keeping the dequantised copy from the
    forward, so a training step holds 4-bit weights, not a full-precision copy per layer, as
    residuals (bitsandbytes' Linear4bit does the same).
    """
    dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    return _quant_matmul(x.astype(dtype), q)


def _matmul(x, q):
    w_OI = dequantize(q, x.dtype)
    return jnp.einsum("...i,oi->...o", x, w_OI, preferred_element_type=jnp.float32).astype(x.dtype)


@jax.custom_vjp
def _quant_matmul(x, q):
    return _matmul(x, q)


def _quant_matmul_fwd(x, q):
    return _matmul(x, q), q


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.floating):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)  # integer codes have no tangent space


def _quant_matmul_bwd(q, dy):
    w_OI = dequantize(q, dy.dtype)
    dx = jnp.einsum("...o,oi->...i", dy, w_OI, preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype), jax.tree.map(_zero_cotangent, q)


_quant_matmul.defvjp(_quant_matmul_fwd, _quant_matmul_bwd)
