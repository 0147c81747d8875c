"""Pure Kronecker math: factored apply (never materialises dW), materialise, pad / truncate.

Convention: a weight is (m, n) = (out, in). A Kronecker factor pair (A, B) with A: (ma, na),
B: (mb, nb) covers (m, n) when ma*mb >= m and na*nb >= n; the effective weight is
kron(A, B)[:m, :n]. Row-major reshape gives, for a zero-padded input x of length na*nb,

    x @ kron(A, B).T == einsum('ij,...jl,kl->...ik', A, x.reshape(na, nb), B).reshape(ma*mb)
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp

Shape2 = tuple[int, int]


def pad_last(x, size: int):
    """Zero-pad the last axis of x up to `size` (no-op when already that size)."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def kron_flops(a_shape: Shape2, b_shape: Shape2) -> tuple[int, int]:
    """Per-token flops of the two contraction orders: (B first, A first)."""
    (ma, na), (mb, nb) = a_shape, b_shape
    return 2 * mb * na * (nb + ma), 2 * ma * nb * (na + mb)


def kron_apply(x, a, b, m: int, n: int):
    """y = x @ kron(a, b)[:m, :n].T for x of shape (..., n), without forming the product."""
    return kron_mixture_apply(x, [(a[None], b[None])], [jnp.ones((1,), a.dtype)], m, n)


def kron_mixture_apply(x, groups: Sequence[tuple], weights: Sequence, m: int, n: int):
    """y = x @ (sum_g sum_c w[g][c] * kron(A[g][c], B[g][c]))[:m, :n].T.

    groups: per group of equal-shaped components, stacked factors (A_CIJ, B_CKL) with
    A_CIJ: (c, ma, na), B_CKL: (c, mb, nb). weights: per group a (c,) vector.
    Components of one group are contracted together, so the mixture sum is folded into the
    second matmul's contraction instead of being a separate reduction.
    """
    lead = x.shape[:-1]
    y = None
    for (a_cij, b_ckl), w_c in zip(groups, weights):
        _, ma, na = a_cij.shape
        _, mb, nb = b_ckl.shape
        x_tjl = pad_last(x, na * nb).reshape(*lead, na, nb)
        a_cij = a_cij * w_c[:, None, None].astype(a_cij.dtype)
        b_first, a_first = kron_flops((ma, na), (mb, nb))
        if b_first <= a_first:
            t_tcjk = jnp.einsum("...jl,ckl->...cjk", x_tjl, b_ckl)
            y_tik = jnp.einsum("...cjk,cij->...ik", t_tcjk, a_cij)
        else:
            t_tcil = jnp.einsum("...jl,cij->...cil", x_tjl, a_cij)
            y_tik = jnp.einsum("...cil,ckl->...ik", t_tcil, b_ckl)
        y_g = y_tik.reshape(*lead, ma * mb)[..., :m]
        y = y_g if y is None else y + y_g
    return y


def kron_materialize(a, b, m: int, n: int):
    """kron(a, b)[:m, :n] as a dense (m, n) array (for merge, export and tests)."""
    return jnp.kron(a, b)[:m, :n]


def blockdiag_apply(x, c, m: int, n: int):
    """y = x @ kron(I_k, c)[:m, :n].T with c: (q, p), k = ceil(n / p)."""
    q, p = c.shape
    k = math.ceil(n / p)
    lead = x.shape[:-1]
    x_tkp = pad_last(x, k * p).reshape(*lead, k, p)
    y_tkq = jnp.einsum("...kp,qp->...kq", x_tkp, c)
    return y_tkq.reshape(*lead, k * q)[..., :m]


def blockdiag_materialize(c, m: int, n: int):
    """kron(I_k, c)[:m, :n] with k = ceil(n / p)."""
    q, p = c.shape
    k = math.ceil(n / p)
    return jnp.kron(jnp.eye(k, dtype=c.dtype), c)[:m, :n]
