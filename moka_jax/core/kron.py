"""Pure Kronecker math: factored apply (never materialises dW), materialise, pad / truncate.

Convention: a weight is (m, n) = (out, in). A Kronecker factor pair (A, B) with A: (ma, na),
B: (mb, nb) covers (m, n) when ma*mb >= m and na*nb >= n; the effective weight is
kron(A, B)[:m, :n]. Row-major reshape gives, for a zero-padded input x of length na*nb,

    x @ kron(A, B).T == einsum('ij,...jl,kl->...ik', A, x.reshape(na, nb), B).reshape(ma*mb)

Dtypes, the same for every apply here, on every path and schedule (the empty batch included):
x's dtype is the compute dtype. Factors and weights of any float dtype are combined in f32 and
cast to it once; every contraction accumulates in f32 (wider if x is f64) and the sum of
components stays in f32; the result is cast once, to x.dtype, or to `preferred_element_type`
when given (as jnp.matmul's). Gradients come back in each input's own dtype.

Schedules of the Kronecker mixture (core/schedules.py), picked by resolve_schedule:
"chunked" (tokens in chunks, hand-written backward, reverse-mode AD only; measured on CPU),
"batched" (one einsum over all tokens, plain JAX: forward-mode AD too), "auto" (the default:
chunked on CPU, batched on GPU / TPU).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from einops import rearrange

from moka_jax.core import schedules
from moka_jax.core.schedules import accumulation_dtype, kron_flops, pad_last
from moka_jax.support.domains import COUNT, check

SCHEDULES = ("auto", "chunked", "batched")

__all__ = ["SCHEDULES", "accumulation_dtype", "blockdiag_apply", "blockdiag_materialize",
           "check_schedule", "kron_apply", "kron_flops", "kron_materialize",
           "kron_mixture_apply", "pad_last", "resolve_schedule"]


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule = {schedule!r}, expected one of {list(SCHEDULES)}")
    return schedule


def resolve_schedule(schedule: str = "auto", backend: str | None = None) -> str:
    """'chunked' or 'batched'. 'auto': chunked on the CPU, where it was measured (chunks keep
    temporaries in cache); batched elsewhere, where one contraction over all tokens fills the
    device instead of a loop of small sequential matmuls. backend: jax.default_backend()."""
    if check_schedule(schedule) != "auto":
        return schedule
    return "chunked" if (backend or jax.default_backend()) == "cpu" else "batched"


def kron_apply(x, a, b, m: int, n: int, *, schedule: str = "auto",
               preferred_element_type=None):
    """y = x @ kron(a, b)[:m, :n].T for x of shape (..., n), without forming the product."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_pair(a.shape, b.shape, m, n, "kron_apply")
    return kron_mixture_apply(x, [(a[None], b[None])], [jnp.ones((1,), jnp.float32)], m, n,
                              schedule=schedule, preferred_element_type=preferred_element_type)


def kron_mixture_apply(x, groups: Sequence[tuple], weights: Sequence, m: int, n: int, *,
                       schedule: str = "auto", preferred_element_type=None):
    """y = x @ (sum_g sum_c w[g][c] * kron(A[g][c], B[g][c]))[:m, :n].T.

    groups: per group of equal-shaped components, stacked factors (A_CIJ, B_CKL) with
    A_CIJ: (c, ma, na), B_CKL: (c, mb, nb). weights: per group a (c,) vector. Dtypes: see the
    module docstring. schedule: "auto" | "chunked" | "batched" (resolve_schedule); both give
    the same values and gradients. Forward-mode AD (jax.jvp, jacfwd, hessian) needs "batched":
    the chunked schedule's custom_vjp makes JAX raise "can't apply forward-mode autodiff".

    Each component is contracted in its cheaper order (kron_flops). In the chunked schedule,
    groups that split the input the same way, (na, nb), share one matmul on the input; groups
    that split the output the same way, (ma, mb), share one matmul that also sums them. Tokens
    go through in chunks of about TOKEN_CHUNK with a hand-written backward, so no x-sized
    intermediate is stored. For x of shape (..., S, n) a chunk takes a run of the S axis from
    every row, so a mesh that shards the leading (batch) axes keeps each device on its own rows.
    """
    x = jnp.asarray(x)
    _check_mixture(x, groups, weights, m, n)
    schedule = resolve_schedule(schedule)
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    factors = []
    for (a, b), w in zip(groups, weights):
        fold = accumulation_dtype(jnp.result_type(a, w))
        factors.append((a.astype(fold) * jnp.asarray(w).astype(fold)[:, None, None], b))
    factors = tuple(factors)
    plan = schedules.make_plan(tuple((a.shape, b.shape) for a, b in factors))
    lead = x.shape[:-1]
    if math.prod(lead) == 0:
        return jnp.zeros((*lead, m), out_dtype)
    if schedule == "batched":
        return schedules.batched(x, factors, plan, m, out_dtype)
    x_RSN = x.reshape(-1, lead[-1] if lead else 1, n)
    return schedules.chunked(x_RSN, factors, plan, m, n, out_dtype).reshape(*lead, m)


def _check_float(x, where: str):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: x must be a floating-point array (its dtype is the compute "
                        f"dtype), got {x.dtype}")


def _check_input(x, n: int, where: str):
    _check_float(x, where)
    if x.ndim == 0 or x.shape[-1] != n:
        raise ValueError(f"{where}: x has shape {x.shape}; its last axis must be n = {n}")


def _check_cover(ma: int, na: int, mb: int, nb: int, m: int, n: int, where: str):
    """The one coverage rule of every apply and materialise: the product is at least (m, n)."""
    check(f"{where}: m (out features)", m, int, COUNT)
    check(f"{where}: n (in features)", n, int, COUNT)
    if ma * mb < m or na * nb < n:
        raise ValueError(
            f"{where}: factors A ({ma}, {na}) and B ({mb}, {nb}) give a ({ma * mb}, {na * nb}) "
            f"product, which does not cover the (m, n) = ({m}, {n}) weight: need ma*mb >= m "
            f"and na*nb >= n")


def _check_pair(a_shape, b_shape, m: int, n: int, where: str):
    """One factor pair (kron_apply, kron_materialize): two matrices covering (m, n)."""
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise ValueError(f"{where}: a and b must be matrices, got shapes {tuple(a_shape)}, "
                         f"{tuple(b_shape)}")
    _check_cover(*a_shape, *b_shape, m, n, where)


def _check_mixture(x, groups, weights, m: int, n: int):
    where = "kron_mixture_apply"
    _check_input(x, n, where)
    if len(groups) == 0 or len(groups) != len(weights):
        raise ValueError(f"{where}: got {len(groups)} factor groups and {len(weights)} weight "
                         f"vectors; pass one (c,) weight vector per group, at least one group")
    for g, ((a, b), w) in enumerate(zip(groups, weights)):
        a_shape, b_shape, w_shape = jnp.shape(a), jnp.shape(b), jnp.shape(w)
        stacked = len(a_shape) == len(b_shape) == 3 and len(w_shape) == 1
        if not (stacked and a_shape[0] == b_shape[0] == w_shape[0]):
            raise ValueError(f"{where}: group {g} has A {a_shape}, B {b_shape}, weights "
                             f"{w_shape}; expected A (c, ma, na), B (c, mb, nb), weights (c,)")
        _check_cover(*a_shape[1:], *b_shape[1:], m, n, f"{where}: group {g}")


def kron_materialize(a, b, m: int, n: int):
    """kron(a, b)[:m, :n] as a dense (m, n) array (for merge, export and tests); checked as
    kron_apply is. Only the rows / columns of `a` whose blocks reach into [:m, :n] are
    expanded, so padding costs at most one block, never the whole padded product."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    _check_pair(a.shape, b.shape, m, n, "kron_materialize")
    (mb, nb) = b.shape
    return jnp.kron(a[:-(-m // mb), :-(-n // nb)], b)[:m, :n]


def _check_blockdiag(c_shape, m: int, n: int, where: str) -> tuple[int, int, int]:
    """(k, q, p) of kron(I_k, c)[:m, :n], checked the same for apply and materialise."""
    check(f"{where}: m (out features)", m, int, COUNT)
    check(f"{where}: n (in features)", n, int, COUNT)
    if len(c_shape) != 2:
        raise ValueError(f"{where}: c must be a (q, p) matrix, got shape {tuple(c_shape)}")
    q, p = c_shape
    k = math.ceil(n / p)
    if k * q < m:
        raise ValueError(f"{where}: {k} blocks of c ({q}, {p}) give {k * q} output rows, "
                         f"fewer than m = {m}; c needs q >= ceil(m / k) = {math.ceil(m / k)}")
    return k, q, p


def blockdiag_apply(x, c, m: int, n: int, *, preferred_element_type=None):
    """y = x @ kron(I_k, c)[:m, :n].T with c: (q, p), k = ceil(n / p). Dtypes: as kron_apply."""
    x, c = jnp.asarray(x), jnp.asarray(c)
    _check_input(x, n, "blockdiag_apply")
    k, _, p = _check_blockdiag(c.shape, m, n, "blockdiag_apply")
    x_kp = rearrange(pad_last(x, k * p), "... (k p) -> ... k p", p=p)
    y_kq = jnp.einsum("...kp,qp->...kq", x_kp, c.astype(x.dtype),
                      preferred_element_type=accumulation_dtype(x.dtype))
    y = rearrange(y_kq, "... k q -> ... (k q)")[..., :m]
    return y.astype(preferred_element_type or x.dtype)


def blockdiag_materialize(c, m: int, n: int):
    """kron(I_k, c)[:m, :n] with k = ceil(n / p); checked as blockdiag_apply is."""
    c = jnp.asarray(c)
    k, _, _ = _check_blockdiag(c.shape, m, n, "blockdiag_materialize")
    return jnp.kron(jnp.eye(k, dtype=c.dtype), c)[:m, :n]
