"""Factored Kronecker apply against numpy's kron, and its gradients against the materialised form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moka_jax.core import kron, schedules as kron_schedule
from moka_jax.parity.torch_ref import TorchMoKA

RTOL = 1e-5  # f32 relative tolerance for values and gradients


def close(a, b, rtol=RTOL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-6)
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


@st.composite
def kron_case(draw):
    ma, na, mb, nb = (draw(st.integers(1, 7)) for _ in range(4))
    m = draw(st.integers(max(1, ma * mb - ma * mb // 3), ma * mb))  # some padded / truncated
    n = draw(st.integers(max(1, na * nb - na * nb // 3), na * nb))
    lead = draw(st.sampled_from([(), (3,), (2, 3)]))
    seed = draw(st.integers(0, 2**31 - 1))
    return ma, na, mb, nb, m, n, lead, seed


@settings(max_examples=60, deadline=None)
@given(kron_case())
def test_kron_apply_equals_numpy_kron(case):
    ma, na, mb, nb, m, n, lead, seed = case
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((ma, na)).astype(np.float32)
    b = rng.standard_normal((mb, nb)).astype(np.float32)
    x = rng.standard_normal(lead + (n,)).astype(np.float32)
    ref = x @ np.kron(a, b)[:m, :n].T
    y = kron.kron_apply(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), m, n)
    assert y.shape == lead + (m,)
    close(y, ref)
    close(kron.kron_materialize(a, b, m, n), np.kron(a, b)[:m, :n])


def _mixture_case(seed, m=37, n=45):
    rng = np.random.default_rng(seed)
    shapes = [((5, 7), (8, 7)), ((5, 7), (8, 7)), ((4, 9), (10, 5)), ((7, 5), (6, 9))]
    a = [rng.standard_normal(s[0]).astype(np.float32) for s in shapes]
    b = [rng.standard_normal(s[1]).astype(np.float32) for s in shapes]
    w = rng.random(len(shapes)).astype(np.float32)
    x = rng.standard_normal((6, n)).astype(np.float32)
    return shapes, a, b, w, x, m, n


def _grouped(a, b, w):
    # components 0 and 1 share a shape and form one group, as MoKA stores them
    groups = [(jnp.stack([a[0], a[1]]), jnp.stack([b[0], b[1]])),
              (a[2][None], b[2][None]), (a[3][None], b[3][None])]
    weights = [jnp.stack([w[0], w[1]]), w[2][None], w[3][None]]
    return groups, weights


def test_mixture_equals_sum_of_numpy_krons():
    shapes, a, b, w, x, m, n = _mixture_case(0)
    dw = sum(w[i] * np.kron(a[i], b[i])[:m, :n] for i in range(len(shapes)))
    groups, weights = _grouped([jnp.asarray(v) for v in a], [jnp.asarray(v) for v in b],
                               jnp.asarray(w))
    close(kron.kron_mixture_apply(jnp.asarray(x), groups, weights, m, n), x @ dw.T)


def test_both_contraction_orders_agree():
    # (2, 64) x (64, 2) is cheaper A-first, (64, 2) x (2, 64) B-first: both paths run.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    for sa, sb in [((2, 64), (64, 2)), ((64, 2), (2, 64))]:
        a = rng.standard_normal(sa).astype(np.float32)
        b = rng.standard_normal(sb).astype(np.float32)
        close(kron.kron_apply(x, a, b, 128, 128), x @ np.kron(a, b).T)
    b_first, a_first = kron.kron_flops((2, 64), (64, 2))
    assert a_first < b_first
    b_first, a_first = kron.kron_flops((64, 2), (2, 64))
    assert b_first < a_first


def test_gradients_match_materialised_form_and_torch():
    shapes, a, b, g, x, m, n = _mixture_case(2)
    y_t = np.random.default_rng(3).standard_normal((6, m)).astype(np.float32)

    def loss_factored(x, a, b, g):
        groups, weights = _grouped(a, b, jax.nn.softmax(g))
        return jnp.sum((kron.kron_mixture_apply(x, groups, weights, m, n) - y_t) ** 2)

    def loss_materialised(x, a, b, g):
        alpha = jax.nn.softmax(g)
        dw = sum(alpha[i] * jnp.kron(a[i], b[i])[:m, :n] for i in range(len(a)))
        return jnp.sum((x @ dw.T - y_t) ** 2)

    args = (jnp.asarray(x), [jnp.asarray(v) for v in a], [jnp.asarray(v) for v in b],
            jnp.asarray(g))
    gf = jax.grad(loss_factored, argnums=(0, 1, 2, 3))(*args)
    gm = jax.grad(loss_materialised, argnums=(0, 1, 2, 3))(*args)
    for u, v in zip(jax.tree.leaves(gf), jax.tree.leaves(gm)):
        close(u, v)

    ref = TorchMoKA(n, m, shapes, scale=1.0, gated=True)
    with torch.no_grad():
        for i in range(len(shapes)):
            ref.a[i].copy_(torch.from_numpy(a[i]))
            ref.b[i].copy_(torch.from_numpy(b[i]))
        ref.g.copy_(torch.from_numpy(g))
    xt = torch.from_numpy(x).requires_grad_(True)
    ((ref(xt) - torch.from_numpy(y_t)) ** 2).sum().backward()
    close(gf[0], xt.grad.numpy())
    for i in range(len(shapes)):
        close(gf[1][i], ref.a[i].grad.numpy())
        close(gf[2][i], ref.b[i].grad.numpy())
    close(gf[3], ref.g.grad.numpy())


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 40), st.integers(2, 40), st.sampled_from([2, 3, 5, 7, 11]),
       st.integers(0, 2**31 - 1))
def test_blockdiag_apply_equals_numpy(m, n, p, seed):
    p = min(p, n)
    k = -(-n // p)
    q = -(-m // k)
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((q, p)).astype(np.float32)
    x = rng.standard_normal((4, n)).astype(np.float32)
    dense = np.kron(np.eye(k, dtype=np.float32), c)[:m, :n]
    close(kron.blockdiag_apply(jnp.asarray(x), jnp.asarray(c), m, n), x @ dense.T)
    close(kron.blockdiag_materialize(jnp.asarray(c), m, n), dense)


# Both schedules over a flat token axis longer than a chunk, rows of a batch and one token,
# every merged-matmul path: tests/core/test_schedules.py.


def test_plan_shares_matmuls_between_groups_with_equal_splits():
    shapes = [((1, 16, 8), (1, 2, 8)), ((1, 8, 8), (1, 8, 8)), ((2, 4, 16), (2, 16, 4))]
    plan = kron_schedule.make_plan(shapes)
    assert plan.a_first == (False, False, True)
    assert plan.x_sides == ((0, 1), (2,))       # B-first groups that split x as (8, 8)
    assert plan.y_sides == ((0,), (1,), (2,))   # output splits all differ


def test_single_token_and_empty_batch():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 4)).astype(np.float32)
    b = rng.standard_normal((5, 2)).astype(np.float32)
    x = rng.standard_normal(8).astype(np.float32)
    close(kron.kron_apply(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), 15, 8),
          x @ np.kron(a, b).T)
    assert kron.kron_apply(jnp.zeros((0, 8)), jnp.asarray(a), jnp.asarray(b), 15, 8).shape == (0, 15)


# ---- dtypes: one rule on every path (module docstring of kron.py) ---------------------------

BF16, F32 = jnp.bfloat16, jnp.float32
BF16_RTOL = 2e-2  # a few bf16 roundings (unit 2^-8) of inputs, mid operands and output


def _mixture_inputs(lead, x_dtype, f_dtype, seed=8):
    m, n = 37, 45
    rng = np.random.default_rng(seed)
    a = [rng.standard_normal(s).astype(np.float32) for s in [(5, 7), (5, 7), (4, 9)]]
    b = [rng.standard_normal(s).astype(np.float32) for s in [(8, 7), (8, 7), (10, 5)]]
    w = rng.random(3).astype(np.float32)
    groups = [(jnp.asarray(np.stack(a[:2]), f_dtype), jnp.asarray(np.stack(b[:2]), f_dtype)),
              (jnp.asarray(a[2][None], f_dtype), jnp.asarray(b[2][None], f_dtype))]
    weights = [jnp.asarray(w[:2], f_dtype), jnp.asarray(w[2:], f_dtype)]
    x = jnp.asarray(rng.standard_normal(lead + (n,)), x_dtype)
    cot = jnp.asarray(rng.standard_normal(lead + (m,)), x_dtype)
    return groups, weights, x, cot, m, n


PATHS = [(0,), (), (5,), (3, 40), (2 * kron_schedule.TOKEN_CHUNK + 7,)]


@pytest.mark.parametrize("schedule", ["chunked", "batched"])
@pytest.mark.parametrize("lead, x_dtype, f_dtype",
                         [(lead, BF16, F32) for lead in PATHS]
                         + [((3, 40), F32, BF16), ((3, 40), BF16, BF16)])
def test_mixture_dtype_rule_on_every_path(schedule, lead, x_dtype, f_dtype):
    # The output has x's dtype on every path (the empty batch, one token, one chunk, the
    # multi-row fori_loop that raised TypeError for bf16 x with f32 factors, the flat scan);
    # gradients have their inputs' dtypes; values are the f32 materialised ones to bf16 accuracy.
    groups, weights, x, cot, m, n = _mixture_inputs(lead, x_dtype, f_dtype)

    def loss(x, groups, weights, how):
        if how == "materialised":
            x, groups, weights = jax.tree.map(lambda v: v.astype(F32), (x, groups, weights))
            dw = sum(jnp.einsum("c,cij,ckl->ikjl", w, a, b).reshape(a.shape[1] * b.shape[1], -1)
                     [:m, :n] for (a, b), w in zip(groups, weights))
            y = x @ dw.T
        else:
            y = kron.kron_mixture_apply(x, groups, weights, m, n, schedule=how)
        return jnp.vdot(y.astype(F32), cot.astype(F32)), y

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    with jax.default_matmul_precision("highest"):
        (_, y), g = grad(x, groups, weights, schedule)
        (_, y_ref), g_ref = grad(x, groups, weights, "materialised")
    assert y.dtype == x_dtype and y.shape == lead + (m,)
    assert jax.tree.map(lambda v: v.dtype, g) == jax.tree.map(lambda v: v.dtype, (x, groups, weights))
    if x.size:
        close(y, y_ref, BF16_RTOL)
        for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            close(u, v, BF16_RTOL)
    y32 = kron.kron_mixture_apply(x, groups, weights, m, n, schedule=schedule,
                                  preferred_element_type=F32)
    assert y32.dtype == F32


@pytest.mark.parametrize("x_dtype, c_dtype", [(BF16, F32), (F32, BF16), (BF16, BF16)])
@pytest.mark.parametrize("lead", [(0,), (), (3, 40)])
def test_blockdiag_dtype_rule(x_dtype, c_dtype, lead):
    m, n = 20, 8
    rng = np.random.default_rng(9)
    c = jnp.asarray(rng.standard_normal((7, 3)), c_dtype)  # k = 3 blocks of 3, 21 >= 20 rows
    x = jnp.asarray(rng.standard_normal(lead + (n,)), x_dtype)
    y = kron.blockdiag_apply(x, c, m, n)
    assert y.dtype == x_dtype and y.shape == lead + (m,)
    dense = kron.blockdiag_materialize(c.astype(F32), m, n)
    if x.size:
        close(y, np.asarray(x, np.float64) @ np.asarray(dense, np.float64).T, BF16_RTOL)
    dx, dc = jax.grad(lambda x, c: kron.blockdiag_apply(x, c, m, n).astype(F32).sum(),
                      argnums=(0, 1))(x, c)
    assert (dx.dtype, dc.dtype) == (x_dtype, c_dtype)
    assert kron.blockdiag_apply(x, c, m, n, preferred_element_type=F32).dtype == F32


def test_factors_that_do_not_cover_the_weight_are_named_errors():
    x = jnp.ones((2, 8))
    a, b = jnp.ones((3, 4)), jnp.ones((5, 2))   # covers (15, 8)
    with pytest.raises(ValueError, match=r"\(15, 8\) product, which does not cover the \(m, n\) "
                                         r"= \(16, 8\).*ma\*mb >= m"):
        kron.kron_apply(x, a, b, 16, 8)
    with pytest.raises(ValueError, match=r"does not cover the \(m, n\) = \(15, 9\)"):
        kron.kron_apply(jnp.ones((2, 9)), a, b, 15, 9)
    with pytest.raises(ValueError, match=r"last axis must be n = 8"):
        kron.kron_apply(jnp.ones((2, 7)), a, b, 15, 8)
    with pytest.raises(ValueError, match="must be matrices"):
        kron.kron_apply(x, a[None], b, 15, 8)
    with pytest.raises(ValueError, match=r"group 0 has A \(2, 3, 4\), B \(1, 5, 2\), weights"):
        kron.kron_mixture_apply(x, [(a[None].repeat(2, 0), b[None])], [jnp.ones(2)], 15, 8)
    with pytest.raises(ValueError, match="one \\(c,\\) weight vector per group"):
        kron.kron_mixture_apply(x, [(a[None], b[None])], [], 15, 8)
    with pytest.raises(TypeError, match="floating-point"):
        kron.kron_apply(jnp.ones((2, 8), jnp.int32), a, b, 15, 8)
    # blockdiag: c (1, 3) on n = 8 gives k = 3 blocks of 1 row: 3 < m = 20
    with pytest.raises(ValueError, match=r"3 blocks of c \(1, 3\) give 3 output rows, fewer "
                                         r"than m = 20; c needs q >= ceil\(m / k\) = 7"):
        kron.blockdiag_apply(x, jnp.ones((1, 3)), 20, 8)
