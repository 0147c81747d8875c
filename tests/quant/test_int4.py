"""Group-wise int4: codes in range, |w - w'| <= step / 2 from the stored scales, and a
loop-per-group reference for dequantisation; nibble packing round trips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moka_jax.quant import dequantize, quantize
from moka_jax.quant.packing import pack_nibbles, unpack_nibbles

# Half a step, up to f32 rounding: w / s carries 2^-24 relative error on |w / s| <= 15.5,
# and (q - z) * s another 2^-24 on |w'| <= 15 s, so 1e-5 of a step covers both.
REL_SLACK = 1e-5


def _codes(q):
    return unpack_nibbles(np.asarray(q.packed), xp=np)


def _reference_dequant(q):
    """A per-group loop over the unpacked nibbles: independent of the vectorised jnp path."""
    n_out, n_in = q.shape
    g = q.block_size
    nib = _codes(q).astype(np.float64)
    scales = np.asarray(q.scales, np.float64)
    zeros = None if q.zeros is None else np.asarray(q.zeros, np.float64)
    out = np.empty((n_out, n_in))
    for r in range(n_out):
        for j in range(n_in // g):
            z = 8.0 if zeros is None else zeros[r, j]
            out[r, j * g:(j + 1) * g] = (nib[r, j * g:(j + 1) * g] - z) * scales[r, j]
    return out


def _weight(seed, n_out, n_groups, group, zero_group):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, size=(n_out, n_groups * group)) * rng.uniform(1e-3, 1, (n_out, 1))
    if zero_group:
        w[0, :group] = 0.0
    return w.astype(np.float32)


shapes = st.tuples(st.integers(1, 6), st.integers(1, 4), st.sampled_from([2, 4, 8, 16, 64]),
                   st.booleans(), st.integers(0, 2**16))


@settings(max_examples=30, deadline=None)
@given(shapes, st.booleans())
def test_round_trip_within_half_step(shape, symmetric):
    n_out, n_groups, group, zero_group, seed = shape
    w = _weight(seed, n_out, n_groups, group, zero_group)
    q = quantize(w, "int4", block_size=group, symmetric=symmetric, name="t")
    codes = _codes(q)
    scales = np.asarray(q.scales, np.float64)
    assert q.packed.shape == (n_out, n_groups * group // 2)
    assert q.scales.shape == (n_out, n_groups) and q.scales.dtype == jnp.float32
    if symmetric:
        assert q.zeros is None
        assert codes.min() >= 1 and codes.max() <= 15  # code - 8 in [-7, 7]
        absmax = np.abs(w.reshape(n_out, n_groups, group)).max(-1)
        np.testing.assert_allclose(scales, absmax / 7, rtol=1e-7)
    else:
        zeros = np.asarray(q.zeros)
        assert q.zeros.shape == (n_out, n_groups) and zeros.max() <= 15
        assert codes.max() <= 15
        w_g = w.reshape(n_out, n_groups, group)
        span = np.maximum(w_g.max(-1), 0) - np.minimum(w_g.min(-1), 0)
        np.testing.assert_allclose(scales, span / 15, rtol=1e-6)
    ref = _reference_dequant(q)
    np.testing.assert_allclose(np.asarray(dequantize(q), np.float64), ref, rtol=1e-7, atol=0)
    err = np.abs(w.astype(np.float64) - ref).reshape(n_out, n_groups, group)
    assert (err <= 0.5 * scales[..., None] * (1 + REL_SLACK)).all()


def test_symmetric_is_odd_and_zero_exact():
    w = _weight(0, 4, 3, 64, zero_group=True)
    q, q_neg = quantize(w, "int4", name="t"), quantize(-w, "int4", name="t")
    assert np.array_equal(16 - _codes(q).astype(int), _codes(q_neg))
    assert (np.asarray(dequantize(q))[0, :64] == 0).all()
    # the group's absmax lands on +-7 exactly
    c = _codes(q).astype(int) - 8
    assert (np.abs(c).reshape(4, 3, 64).max(-1) == 7)[1:].all()


def test_asymmetric_keeps_zero_exact_and_uses_full_range():
    w = np.random.default_rng(1).uniform(-0.3, 1.0, (4, 128)).astype(np.float32)
    w[:, 3] = 0.0
    q = quantize(w, "int4", block_size=64, symmetric=False, name="t")
    assert (np.asarray(dequantize(q))[:, 3] == 0).all()
    c = _codes(q).reshape(4, 2, 64)
    assert (c.min(-1) == 0).all() and (c.max(-1) == 15).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 2**16))
def test_pack_unpack_round_trip(rows, half, seed):
    codes = np.random.default_rng(seed).integers(0, 16, (rows, 2 * half)).astype(np.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (rows, half) and packed.dtype == np.uint8
    assert np.array_equal(packed >> 4, codes[:, 0::2])  # even index in the high nibble
    assert np.array_equal(unpack_nibbles(packed, xp=np), codes)


@pytest.mark.parametrize("shape", [(1, 2), (3, 66), (2, 4, 10)])
def test_pack_unpack_jnp_matches_numpy(shape):
    codes = np.random.default_rng(0).integers(0, 16, shape).astype(np.uint8)
    packed, unpacked = jax.jit(lambda c: (pack_nibbles(c), unpack_nibbles(pack_nibbles(c))))(codes)
    assert np.array_equal(np.asarray(packed), pack_nibbles(codes))
    assert np.array_equal(np.asarray(unpacked), codes)
