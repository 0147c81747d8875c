"""QuantizedWeight as a pytree, quant_matmul against explicit matmuls, nbytes, bad input."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moka_jax.quant import QUANT_KINDS, QuantizedWeight, dequantize, quant_matmul, quantize

CONFIGS = [
    dict(kind="nf4"),
    dict(kind="nf4", double_quant=True),
    dict(kind="int4"),
    dict(kind="int4", symmetric=False),
]


def _w(n_out=48, n_in=256, seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).normal(size=(n_out, n_in)) * 0.05).astype(dtype)


def test_public_names():
    assert QUANT_KINDS == ("nf4", "int4")


@pytest.mark.parametrize("cfg", CONFIGS)
def test_pytree_static_metadata_and_nbytes(cfg):
    q = quantize(_w(), block_size=64, name="t", **cfg)
    n_out, n_in, bs = 48, 256, 64
    assert q.shape == (n_out, n_in) and q.kind == cfg["kind"] and q.block_size == bs
    assert q.orig_dtype == "float32"
    assert q.double_quant == cfg.get("double_quant", False)
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (n_out, n_in // 2)
    assert q.scales.shape == (n_out, n_in // bs)
    leaves, treedef = jax.tree.flatten(q)
    assert all(isinstance(x, jax.Array) for x in leaves)
    back = jax.tree.unflatten(treedef, leaves)
    assert (back.kind, back.shape, back.block_size) == (q.kind, q.shape, q.block_size)
    n_blocks = n_out * n_in // bs
    if cfg["kind"] == "nf4" and cfg.get("double_quant"):
        expected = n_out * n_in // 2 + n_blocks + 4 * math.ceil(n_blocks / 256) + 4
        assert len(leaves) == 4
    elif cfg["kind"] == "int4" and cfg.get("symmetric") is False:
        expected = n_out * n_in // 2 + 4 * n_blocks + n_blocks  # f32 scales + uint8 zeros
        assert len(leaves) == 3
    else:
        expected = n_out * n_in // 2 + 4 * n_blocks
        assert len(leaves) == 2
    assert q.nbytes == expected
    # about half a byte per weight: 0.5 + 4/64 (f32 scales), + 1/64 more for int4 zero points
    assert q.nbytes / (n_out * n_in) <= 0.5 + 5 / bs


@pytest.mark.parametrize("cfg", CONFIGS)
def test_quant_matmul_equals_explicit_matmuls(cfg):
    q = quantize(_w(), name="t", **cfg)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 256)), jnp.float32)
    w = dequantize(q)
    assert w.shape == (48, 256) and w.dtype == jnp.float32
    assert np.array_equal(np.asarray(q.dequantize()), np.asarray(w))
    y = quant_matmul(x, q)
    assert y.shape == (2, 3, 48) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(x @ w.T), rtol=1e-5, atol=1e-6)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
    # inside a user's jit, with q as a traced pytree argument
    y_jit = jax.jit(lambda x, q: quant_matmul(x, q) * 2.0)(x, q)
    np.testing.assert_allclose(np.asarray(y_jit), 2 * np.asarray(y), rtol=1e-6, atol=1e-7)


def test_quant_matmul_bf16_compute_dtype():
    q = quantize(_w(), "nf4", name="t")
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 256)), jnp.float32)
    y = quant_matmul(x, q, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x.astype(jnp.bfloat16), np.float64) @ np.asarray(dequantize(q, jnp.bfloat16), np.float64).T
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2**-7, atol=1e-2)


def test_jax_and_bf16_inputs_match_numpy_path():
    w = _w(dtype=ml_dtypes.bfloat16)
    q_np = quantize(w, name="t")
    q_jax = quantize(jnp.asarray(w), name="t")
    assert q_jax.orig_dtype == "bfloat16"
    assert np.array_equal(np.asarray(q_np.packed), np.asarray(q_jax.packed))
    assert np.array_equal(np.asarray(q_np.scales), np.asarray(q_jax.scales))


BAD = [
    (dict(w=_w(), kind="fp4"), "unknown kind"),
    (dict(w=_w()[0]), "not 2-D"),
    (dict(w=np.zeros((2, 4, 64), np.float32)), "not 2-D"),
    (dict(w=np.ones((4, 64), np.int8)), "int8 cannot be quantised"),
    (dict(w=np.ones((4, 64), bool)), "bool cannot be quantised"),
    (dict(w=np.ones((4, 64), np.complex64)), "complex64 cannot be quantised"),
    (dict(w=np.ones((4, 63), np.float32)), "odd"),
    (dict(w=np.ones((4, 100), np.float32)), "try block_size=50"),
    (dict(w=np.ones((4, 100), np.float32), kind="int4"), "not a multiple of group size"),
    (dict(w=_w(), block_size=0), "positive int"),
    (dict(w=_w(), kind="int4", double_quant=True), "nf4 only"),
    (dict(w=np.zeros((0, 64), np.float32)), "empty"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_names_the_layer(kw, msg):
    kw = dict(kw)
    with pytest.raises(ValueError) as e:
        quantize(kw.pop("w"), **kw, name="model.layers.3.self_attn.q_proj")
    assert "model.layers.3.self_attn.q_proj" in str(e.value)
    assert msg in str(e.value)


@pytest.mark.parametrize("kind", QUANT_KINDS)
def test_non_finite_weight_is_rejected(kind):
    w = _w()
    w[5, 130] = np.nan
    with pytest.raises(ValueError, match="layers.0.v_proj.*NaN or Inf.*row 5, columns 128..191"):
        quantize(w, kind, name="layers.0.v_proj")
    w[5, 130] = np.inf
    with pytest.raises(ValueError, match="layers.0.v_proj"):
        quantize(w, kind, name="layers.0.v_proj")


def test_is_a_flax_struct_dataclass():
    q = quantize(_w(), name="t")
    assert isinstance(q, QuantizedWeight)
    q2 = q.replace(scales=q.scales * 2)
    np.testing.assert_allclose(np.asarray(dequantize(q2)), 2 * np.asarray(dequantize(q)), rtol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quant_matmul_gradient_equals_the_dequantised_matmul(dtype):
    """The hand-written backward (W dequantised again, not saved) gives autodiff's dx."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    q = quantize(w, "nf4", block_size=16)
    x = jnp.asarray(rng.standard_normal((2, 5, 64)), dtype)
    dy = jnp.asarray(rng.standard_normal((2, 5, 48)), dtype)
    ref = jax.vjp(lambda x: jnp.einsum("...i,oi->...o", x, dequantize(q, dtype),
                                       preferred_element_type=jnp.float32).astype(dtype), x)[1](dy)[0]
    got = jax.jit(lambda x, dy: jax.vjp(lambda x: quant_matmul(x, q), x)[1](dy)[0])(x, dy)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
