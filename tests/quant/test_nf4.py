"""NF4 against bitsandbytes 0.50.2 on CPU: packed bytes, absmax, double quant and dequant.

Tolerances: codes, absmax, absmax codes, absmax2 and dequantised weights are compared for
exact equality; only the double-quant offset (a mean, summed in a different order than
torch) is allowed one f32 ulp, and the end-to-end dequant that inherits it a matching bound.
"""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
bnbF = pytest.importorskip("bitsandbytes.functional")

from moka_jax.quant import NF4_CODE, dequantize, quantize  # noqa: E402
from moka_jax.quant import nf4, packing  # noqa: E402

TORCH_DTYPE = {np.float32: torch.float32, np.float16: torch.float16,
               ml_dtypes.bfloat16: torch.bfloat16}


def _bnb(w_np, block_size=64, dq=False):
    """bnb quantize_4bit on the same (out, in) weight; returns (packed, state)."""
    t = torch.from_numpy(w_np.astype(np.float32)).to(TORCH_DTYPE[w_np.dtype.type])
    return bnbF.quantize_4bit(t, blocksize=block_size, quant_type="nf4",
                              compress_statistics=dq)


def _special_weight(n_out=6, n_in=256, seed=0):
    """Random rows plus values exactly on midpoints, on code points, zeros, -0.0 and a zero block."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n_out, n_in)).astype(np.float32)
    mids, codes = nf4.NF4_MIDPOINTS, NF4_CODE
    # row 0: absmax exactly 1 (and 2 for the second half), so w * (1 / absmax) is exact.
    row = np.concatenate([mids, codes, np.nextafter(mids, 2), np.nextafter(mids, -2), [0.0, -0.0]])
    row = np.resize(row, n_in).astype(np.float32)
    row[0::64] = 1.0
    row[n_in // 2:] *= 2
    w[0] = row
    w[1, :64] = 0.0                     # an all-zero block
    w[1, 64:128] = -0.0
    w[2] = np.resize(mids * np.float32(0.37), n_in)  # midpoints under a non-power-of-2 absmax
    w[3, 5] = w[3, 70] = 0.0
    return w


@pytest.mark.parametrize("shape", [(1, 64), (4, 128), (33, 192), (64, 512)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_codes_absmax_and_dequant_equal_bnb(shape, dtype):
    w = (np.random.default_rng(sum(shape)).normal(size=shape) * 0.05).astype(dtype)
    q = quantize(w, "nf4", name="t")
    packed, st = _bnb(w)
    assert np.array_equal(np.asarray(q.packed).reshape(-1), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.scales).reshape(-1), st.absmax.numpy())
    ref = bnbF.dequantize_4bit(packed, st)  # in the input dtype, computed in f32 then cast
    ours = dequantize(q, jnp.dtype(dtype))
    assert np.array_equal(np.asarray(ours).astype(np.float32), ref.float().numpy())
    st.dtype = torch.float32  # and the f32 weight bnb computes before that cast
    assert np.array_equal(np.asarray(dequantize(q)), bnbF.dequantize_4bit(packed, st).numpy())


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_ties_zeros_and_zero_block_equal_bnb(block_size):
    w = _special_weight()
    q = quantize(w, "nf4", block_size=block_size, name="t")
    packed, st = _bnb(w, block_size)
    assert np.array_equal(np.asarray(q.packed).reshape(-1), packed.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.scales).reshape(-1), st.absmax.numpy())
    assert np.array_equal(np.asarray(dequantize(q)), bnbF.dequantize_4bit(packed, st).numpy())


def test_midpoint_rule_ties_go_down():
    """code = number of midpoints strictly below: a value on a midpoint takes the lower code."""
    w = np.resize(np.concatenate([[1.0], nf4.NF4_MIDPOINTS]), 64).astype(np.float32)[None]
    codes = packing.unpack_nibbles(np.asarray(quantize(w, name="t").packed), xp=np)[0]
    assert codes[0] == 15
    assert np.array_equal(codes[1:16], np.arange(15))
    z = packing.unpack_nibbles(np.asarray(quantize(np.zeros((1, 64), np.float32)).packed), xp=np)
    assert (z == 7).all()  # NF4_CODE[7] == 0.0


def test_code_book_equals_bnb():
    ref = bnbF.get_4bit_type("nf4", device="cpu").numpy()
    assert NF4_CODE.dtype == np.float32 and np.array_equal(NF4_CODE, ref)


def test_row_chunking_does_not_change_result(monkeypatch):
    w = _special_weight(n_out=37, n_in=128, seed=3)
    whole = quantize(w, name="t")
    monkeypatch.setattr(nf4, "row_chunks", lambda r, c: packing.row_chunks(r, c, target_elems=300))
    chunked = quantize(w, name="t")
    assert np.array_equal(np.asarray(whole.packed), np.asarray(chunked.packed))
    assert np.array_equal(np.asarray(whole.scales), np.asarray(chunked.scales))


# ---- double quantisation ----

def test_dynamic_map_equals_bnb():
    assert np.array_equal(nf4.create_dynamic_map(signed=True),
                          bnbF.create_dynamic_map(signed=True).numpy())
    assert np.array_equal(nf4.create_dynamic_map(signed=False),
                          bnbF.create_dynamic_map(signed=False).numpy())


def test_dynamic_quantiser_equals_bnb_blockwise():
    """Our 8-bit rounding == bnb quantize_blockwise(blocksize=256) on CPU, including values on
    code points and midpoints, tiny values near 0 (where the 2^16-bin grid is coarser than the
    codes), an all-zero block and a partial last block."""
    rng = np.random.default_rng(0)
    c = nf4.DYNAMIC_MAP
    mids = (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)
    x = np.concatenate([c, mids, np.nextafter(mids, 2), np.nextafter(mids, -2),
                        rng.normal(0, 1e-4, 500), rng.uniform(-1, 1, 3000)]).astype(np.float32)
    x = np.clip(x, -1, 1)
    x = np.concatenate([x, np.zeros(256, np.float32), rng.normal(size=100).astype(np.float32)])
    codes, absmax2, _ = nf4.double_quantize(x[None], offset=0.0)
    ref, st = bnbF.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    assert np.array_equal(codes.reshape(-1), ref.numpy())
    assert np.array_equal(absmax2, st.absmax.numpy())


@pytest.mark.parametrize("shape", [(16, 256), (40, 320), (128, 1024)])
def test_double_quant_equals_bnb(shape):
    w = (np.random.default_rng(1).normal(size=shape) * 0.02).astype(np.float32)
    packed, st = _bnb(w, dq=True)
    q = quantize(w, "nf4", double_quant=True, name="t")
    # offset: a mean; torch sums in another order, so allow one ulp.
    off_ref = st.offset.numpy()
    assert abs(float(q.offset) - float(off_ref)) <= np.spacing(off_ref)
    # with bnb's offset, absmax codes / absmax2 / dequantised weight are bit-identical.
    absmax = np.asarray(quantize(w, "nf4", name="t").scales)
    codes, absmax2, off = nf4.double_quantize(absmax, offset=off_ref)
    assert np.array_equal(codes.reshape(-1), st.absmax.numpy())
    assert np.array_equal(absmax2, st.state2.absmax.numpy())
    q_same = q.replace(scales=jnp.asarray(codes), scales2=jnp.asarray(absmax2),
                       offset=jnp.asarray(off))
    ref = bnbF.dequantize_4bit(packed, st).numpy()
    assert np.array_equal(np.asarray(dequantize(q_same)), ref)
    # our own offset: the absmax moves by ~1 ulp of offset, the weight by at most that.
    tol = 4 * np.spacing(np.float32(absmax.max()))
    assert np.abs(np.asarray(dequantize(q)) - ref).max() <= tol


def test_double_quant_round_trip_bound():
    """|w - w'| <= absmax * (max NF4 half gap) + |absmax - absmax'|, and the absmax error is
    at most absmax2 * (max dynamic-map half gap + one 2/65535 grid bin)."""
    w = (np.random.default_rng(2).standard_t(4, size=(48, 512)) * 0.02).astype(np.float32)
    q1 = quantize(w, "nf4", name="t")
    q2 = quantize(w, "nf4", double_quant=True, name="t")
    absmax = np.asarray(q1.scales, np.float64)
    absmax_dq = np.asarray(nf4.dequantize_absmax(q2.scales, q2.scales2, q2.offset), np.float64)
    half_gap_dyn = np.diff(nf4.DYNAMIC_MAP.astype(np.float64)).max() / 2 + 2 / 65535
    a2 = np.repeat(np.asarray(q2.scales2, np.float64), 256)[:absmax.size].reshape(absmax.shape)
    assert (np.abs(absmax - absmax_dq) <= a2 * half_gap_dyn * (1 + 1e-6) + 1e-12).all()
    half_gap_nf4 = np.diff(NF4_CODE.astype(np.float64)).max() / 2
    err = np.abs(w - np.asarray(dequantize(q2), np.float64)).reshape(48, -1, 64)
    bound = (absmax * half_gap_nf4 + np.abs(absmax - absmax_dq)) * (1 + 1e-6) + 1e-12
    assert (err <= bound[..., None]).all()


def test_device_quantiser_is_the_host_one_bit_for_bit():
    from moka_jax.quant.nf4 import quantize_nf4_on_device

    w = np.random.default_rng(0).standard_normal((48, 256)).astype(np.float32) * 0.03
    w[5, 64:128] = 0.0  # an all-zero block: code 7, as bitsandbytes
    host = quantize(w, "nf4", block_size=64)
    packed, absmax = quantize_nf4_on_device(jnp.asarray(w), 64)
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(host.packed))
    np.testing.assert_array_equal(np.asarray(absmax), np.asarray(host.scales))
