"""kron_fit against numpy: Van Loan-Pitsianis fits, MoKA from a delta, LoRA SVD, effective rank."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moka_jax.adapters import fit as kron_fit
from moka_jax.adapters.lora import DoRA, LoRA
from moka_jax.adapters.moka import MoKA

EXACT = ((3, 4), (5, 2))  # (15, 8)
PADDED = ((3, 3), (5, 3))  # covers (15, 9) but fits a (13, 8) matrix


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_rearrangement_round_trips_and_maps_kron_to_rank_one():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=EXACT[0]), rng.normal(size=EXACT[1])
    r = kron_fit.kron_rearrange(np.kron(a, b), EXACT)
    np.testing.assert_allclose(r, np.outer(a.ravel(), b.ravel()), atol=1e-12)
    w = rng.normal(size=(15, 8))
    np.testing.assert_array_equal(kron_fit.kron_unrearrange(kron_fit.kron_rearrange(w, EXACT),
                                                            EXACT, 15, 8), w)


def test_vlp_fit_recovers_an_exact_kronecker_product():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=EXACT[0]), rng.normal(size=EXACT[1])
    w = np.kron(a, b)
    fa, fb, rest = kron_fit.kron_svd_fit(w, EXACT)
    assert fa.shape == EXACT[0] and fb.shape == EXACT[1]
    assert rel(np.kron(fa, fb), w) < 1e-6 and rest < 1e-6 * np.linalg.norm(w)
    assert np.isclose(np.linalg.norm(fa), np.linalg.norm(fb))  # balanced split


def test_vlp_error_is_the_non_leading_singular_values_and_optimal():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(15, 8))
    fa, fb, rest = kron_fit.kron_svd_fit(w, EXACT)
    s = np.linalg.svd(kron_fit.kron_rearrange(w, EXACT), compute_uv=False)
    err = np.linalg.norm(w - np.kron(fa, fb))
    assert np.isclose(err, math.sqrt(np.sum(s[1:] ** 2)), rtol=1e-10)
    assert np.isclose(rest, err, rtol=1e-10)
    for _ in range(50):  # no nearby (A, B) does better
        pa = fa + 1e-2 * rng.normal(size=fa.shape)
        pb = fb + 1e-2 * rng.normal(size=fb.shape)
        assert np.linalg.norm(w - np.kron(pa, pb)) > err
    # ... nor random ones, nor least squares in A with B fixed (a stationary point)
    for _ in range(20):
        assert np.linalg.norm(w - np.kron(rng.normal(size=fa.shape), fb)) > err
    r = kron_fit.kron_rearrange(w, EXACT)
    b_vec = fb.ravel()
    a_ls = (r @ b_vec) / (b_vec @ b_vec)
    np.testing.assert_allclose(a_ls, fa.ravel(), atol=1e-10)


def test_padding_fits_only_the_real_entries_never_worse_than_zero_padding():
    rng = np.random.default_rng(3)
    m, n = 13, 8
    w = rng.normal(size=(m, n))
    fa, fb, rest = kron_fit.kron_svd_fit(w, PADDED)
    fit = np.kron(fa, fb)[:m, :n]
    assert np.isclose(rest, np.linalg.norm(w - fit), rtol=1e-10)
    # Zero-padded VLP: the optimum when the padded entries must be 0.
    pad = np.zeros((15, 9))
    pad[:m, :n] = w
    za, zb, zrest = kron_fit.kron_svd_fit(pad, PADDED)
    zero_err = np.linalg.norm(w - np.kron(za, zb)[:m, :n])
    assert rest < zero_err  # imputation used the free entries
    # It is a stationary point of the masked problem: least squares in A with B fixed.
    mask = kron_fit.kron_rearrange(np.ones((m, n), bool), PADDED)
    r = kron_fit.kron_rearrange(w, PADDED)
    bv = fb.ravel()
    a_ls = (mask * r) @ bv / (mask @ bv ** 2)
    np.testing.assert_allclose(a_ls, fa.ravel(), rtol=1e-4, atol=1e-6)
    # An exact product that the truncation hides is recovered on the real entries.
    a, b = rng.normal(size=PADDED[0]), rng.normal(size=PADDED[1])
    target = np.kron(a, b)[:m, :n]
    fa, fb, rest = kron_fit.kron_svd_fit(target, PADDED)
    assert rel(np.kron(fa, fb)[:m, :n], target) < 1e-5


@pytest.mark.parametrize("k", [1, 2, 5])
def test_rank_k_sum_is_numpys_truncated_svd_of_the_rearrangement(k):
    rng = np.random.default_rng(4)
    w = rng.normal(size=(15, 8))
    a, b, rest = kron_fit.kron_svd_fit_sum(w, EXACT, k)
    assert a.shape == (k, *EXACT[0]) and b.shape == (k, *EXACT[1])
    fit = sum(np.kron(a[i], b[i]) for i in range(k))
    r = kron_fit.kron_rearrange(w, EXACT)
    u, s, vt = np.linalg.svd(r, full_matrices=False)
    want = (u[:, :k] * s[:k]) @ vt[:k]
    np.testing.assert_allclose(kron_fit.kron_rearrange(fit, EXACT), want, atol=1e-10)
    assert np.isclose(rest, math.sqrt(np.sum(s[k:] ** 2)), rtol=1e-10)


def test_bad_shapes_and_ranks_are_refused():
    w = np.zeros((15, 8))
    with pytest.raises(ValueError, match="covers"):
        kron_fit.kron_svd_fit(w, ((2, 4), (5, 2)))
    with pytest.raises(ValueError, match="1 <= k"):
        kron_fit.kron_svd_fit_sum(w, EXACT, 11)
    with pytest.raises(ValueError, match="1 <= r"):
        kron_fit.lora_svd_fit(w, 9)


def test_lora_svd_fit_matches_numpy():
    rng = np.random.default_rng(5)
    w = rng.normal(size=(12, 7))
    b, a, rest = kron_fit.lora_svd_fit(w, 3)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(b @ a, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-12)
    assert np.isclose(rest, np.linalg.norm(w - b @ a)) and np.isclose(
        rest, math.sqrt(np.sum(s[3:] ** 2)))


def test_effective_rank():
    assert np.isclose(kron_fit.effective_rank(np.eye(7)), 7)
    assert np.isclose(kron_fit.effective_rank(3.0 * np.eye(5)), 5)
    rng = np.random.default_rng(6)
    assert np.isclose(kron_fit.effective_rank(np.outer(rng.normal(size=9), rng.normal(size=4))), 1)
    assert kron_fit.effective_rank(np.zeros((3, 3))) == 0.0
    # exp of the entropy of sigma / sum(sigma)
    p = np.array([3.0, 1.0]) / 4
    assert np.isclose(kron_fit.effective_rank(np.diag([3.0, 1.0])), np.exp(-np.sum(p * np.log(p))))


SHAPES = [((3, 4), (5, 2)), ((5, 2), (3, 4)), ((3, 4), (5, 2))]  # two groups, one repeated


def test_moka_from_delta_layout_and_never_worse_than_its_start():
    rng = np.random.default_rng(7)
    w = 0.01 * rng.normal(size=(15, 8))
    start, info0 = kron_fit.moka_from_delta(w, SHAPES, scale=2.0, steps=0, return_info=True)
    fac, info = kron_fit.moka_from_delta(w, SHAPES, scale=2.0, steps=200, lr=1e-2,
                                         return_info=True)
    assert [a.shape for a in fac["a"]] == [(2, 3, 4), (1, 5, 2)]
    assert [b.shape for b in fac["b"]] == [(2, 5, 2), (1, 3, 4)]
    assert fac["g"].shape == (3,) and not fac["g"].any()
    assert np.isclose(info0["rel_error"], info0["rel_error_start"], rtol=1e-5)
    assert np.isclose(info0["rel_error"], rel(kron_fit.moka_delta(start, 15, 8), w) , rtol=1e-6)
    assert info["rel_error"] <= info0["rel_error"] + 1e-6
    assert info["rel_error"] < info0["rel_error"] - 1e-3  # the joint refinement helps here
    # A bad lr (Adam overshoots) still returns no worse than the start.
    _, bad = kron_fit.moka_from_delta(w, SHAPES, scale=2.0, steps=20, lr=10.0, return_info=True)
    assert bad["rel_error"] <= info0["rel_error"] + 1e-5


def test_moka_from_delta_reaches_an_exact_sum_of_two_products():
    rng = np.random.default_rng(8)
    shapes = [((3, 4), (5, 2)), ((5, 2), (3, 4))]
    w = sum(np.kron(rng.normal(size=s[0]), rng.normal(size=s[1])) for s in shapes)
    fac, info = kron_fit.moka_from_delta(w, shapes, scale=1.5, steps=2000, lr=1e-2,
                                         return_info=True)
    assert info["rel_error_start"] > 0.05  # greedy alone does not get there
    assert info["rel_error"] < 1e-3
    assert rel(kron_fit.moka_delta(fac, 15, 8), w) < 1e-3


def test_fit_gates_trains_g_and_keeps_the_fit():
    rng = np.random.default_rng(9)
    w = rng.normal(size=(15, 8))
    fac, info = kron_fit.moka_from_delta(w, SHAPES, steps=100, lr=1e-2, fit_gates=True,
                                         return_info=True)
    assert np.abs(fac["g"]).max() > 0
    assert np.isclose(info["rel_error"], rel(kron_fit.moka_delta(fac, 15, 8), w), rtol=1e-4)


@pytest.mark.parametrize("gated", [True, False])
def test_load_into_a_moka_adapter_gives_the_fitted_delta(gated):
    rng = np.random.default_rng(10)
    w = rng.normal(size=(15, 8))
    fac = kron_fit.moka_from_delta(w, SHAPES, scale=2.0, steps=50, lr=1e-2, fit_gates=True)
    adapter = MoKA(8, 15, SHAPES, scale=0.5, gated=gated, rngs=nnx.Rngs(0))
    kron_fit.load_into(adapter, fac)
    np.testing.assert_allclose(np.asarray(adapter.delta_weight()),
                               kron_fit.moka_delta(fac, 15, 8), rtol=1e-4, atol=1e-5)
    # and the factored apply (never materialised) agrees
    x = rng.normal(size=(4, 8)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(adapter.delta(jnp.asarray(x))),
                               x @ kron_fit.moka_delta(fac, 15, 8).T, rtol=1e-4, atol=1e-4)
    other = MoKA(8, 15, SHAPES[:2], scale=2.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shapes"):
        kron_fit.load_into(other, fac)


def test_load_into_lora_and_refuse_dora():
    rng = np.random.default_rng(11)
    w = rng.normal(size=(15, 8))
    b, a, _ = kron_fit.lora_svd_fit(w, 3)
    lora = LoRA(8, 15, 3, alpha=6.0, rngs=nnx.Rngs(0))
    kron_fit.load_into(lora, {"lora_b": b, "lora_a": a})
    np.testing.assert_allclose(np.asarray(lora.delta_weight()), b @ a, rtol=1e-5, atol=1e-5)
    dora = DoRA(8, 15, 3, alpha=6.0, w0=jnp.ones((15, 8)), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="DoRA"):
        kron_fit.load_into(dora, {"lora_b": b, "lora_a": a})


def test_padded_rank_k_sum_beats_zero_padding_and_reports_its_error():
    rng = np.random.default_rng(12)
    m, n = 13, 8
    w = rng.normal(size=(m, n))
    a, b, rest = kron_fit.kron_svd_fit_sum(w, PADDED, 3)
    fit = sum(np.kron(a[i], b[i])[:m, :n] for i in range(3))
    assert np.isclose(rest, np.linalg.norm(w - fit), rtol=1e-10)
    r = kron_fit.kron_rearrange(w, PADDED)  # zero padded
    u, s, vt = np.linalg.svd(r, full_matrices=False)
    zero = kron_fit.kron_unrearrange((u[:, :3] * s[:3]) @ vt[:3], PADDED, m, n)
    assert rest < np.linalg.norm(w - zero)
    # largest first, balanced
    norms = [np.linalg.norm(np.kron(a[i], b[i])) for i in range(3)]
    assert norms == sorted(norms, reverse=True)


def test_moka_from_delta_refuses_a_zero_target_and_a_wrong_start():
    with pytest.raises(ValueError, match="zero"):
        kron_fit.moka_from_delta(np.zeros((15, 8)), SHAPES)
    w = np.random.default_rng(13).normal(size=(15, 8))
    with pytest.raises(ValueError, match="start has 1 components"):
        kron_fit.moka_from_delta(w, SHAPES, start=kron_fit.greedy_kron_start(w, SHAPES[:1]))


def test_greedy_start_prefix_and_start_argument():
    w = np.random.default_rng(14).normal(size=(15, 8))
    long = kron_fit.greedy_kron_start(w, SHAPES)
    short = kron_fit.greedy_kron_start(w, SHAPES[:2])
    for (a1, b1), (a2, b2) in zip(long, short):
        np.testing.assert_allclose(np.kron(a1, b1), np.kron(a2, b2), atol=1e-10)
    # components of one shape take successive singular pairs: greedy == rank-2 sum there
    a, b, rest = kron_fit.kron_svd_fit_sum(w, SHAPES[0], 2)
    greedy_same = kron_fit.greedy_kron_start(w, [SHAPES[0], SHAPES[0]])
    fit = sum(np.kron(x, y) for x, y in greedy_same)
    assert np.isclose(np.linalg.norm(w - fit), rest, rtol=1e-8)
    f1, i1 = kron_fit.moka_from_delta(w, SHAPES, steps=0, return_info=True)
    f2, i2 = kron_fit.moka_from_delta(w, SHAPES, steps=0, start=long, return_info=True)
    assert np.isclose(i1["rel_error"], i2["rel_error"], rtol=1e-6)
