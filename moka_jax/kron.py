"""Pure Kronecker math: factored apply (never materialises dW), materialise, pad / truncate.

Convention: a weight is (m, n) = (out, in). A Kronecker factor pair (A, B) with A: (ma, na),
B: (mb, nb) covers (m, n) when ma*mb >= m and na*nb >= n; the effective weight is
kron(A, B)[:m, :n]. Row-major reshape gives, for a zero-padded input x of length na*nb,

    x @ kron(A, B).T == einsum('ij,...jl,kl->...ik', A, x.reshape(na, nb), B).reshape(ma*mb)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Shape2 = tuple[int, int]

# Tokens per step of the mixture apply. A chunk's intermediates stay in the L2 cache, and XLA
# allocates only chunk-sized temporaries: on CPU every fresh multi-MB buffer costs page faults
# on each call. On 4096x4096 and 4096->1024 (bench/adapter_ops.py) chunks of 64..256 tokens
# were equally fast; one chunk of 2048 was 10-25% slower.
TOKEN_CHUNK = 64


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

    Each component is contracted in its cheaper order (kron_flops). Groups that split the
    input the same way, (na, nb), share one matmul on the input; groups that split the output
    the same way, (ma, mb), share one matmul that also sums them. Tokens go through in chunks
    of about TOKEN_CHUNK with a hand-written backward, so no x-sized intermediate is stored.
    For x of shape (..., S, n) a chunk takes a run of the S axis from every row, so a mesh
    that shards the leading (batch) axes keeps each device on its own rows.
    """
    lead = x.shape[:-1]
    factors = tuple((a * w[:, None, None].astype(a.dtype), b)
                    for (a, b), w in zip(groups, weights))
    plan = _make_plan(tuple((a.shape, b.shape) for a, b in factors))
    if math.prod(lead) == 0:
        return jnp.zeros((*lead, m), x.dtype)
    x_RSN = x.reshape(-1, lead[-1] if lead else 1, n)
    return _mixture(x_RSN, factors, plan, m, n).reshape(*lead, m)


# ---- plan: contraction order per group, and which groups share a matmul -------------------

@dataclasses.dataclass(frozen=True)
class _Plan:
    a_first: tuple[bool, ...]               # per group: contract A (over na) first
    x_sides: tuple[tuple[int, ...], ...]    # groups sharing (order, na, nb): one input matmul
    y_sides: tuple[tuple[int, ...], ...]    # groups sharing (order, ma, mb): one output matmul


def _make_plan(shapes) -> _Plan:
    a_first, x_sides, y_sides = [], {}, {}
    for g, ((_, ma, na), (_, mb, nb)) in enumerate(shapes):
        b_cost, a_cost = kron_flops((ma, na), (mb, nb))
        a_first.append(a_cost < b_cost)
        x_sides.setdefault((a_first[-1], na, nb), []).append(g)
        y_sides.setdefault((a_first[-1], ma, mb), []).append(g)
    return _Plan(tuple(a_first), tuple(map(tuple, x_sides.values())),
                 tuple(map(tuple, y_sides.values())))


def _dims(factors, g):
    (c, ma, na), (_, mb, nb) = factors[g][0].shape, factors[g][1].shape
    return c, ma, na, mb, nb


def _concat(arrays, axis):
    return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays, axis)


# Layouts, per chunk of t tokens (R = t * something, "rows" of a 2-D matmul):
#   input side   B-first: x as (t*na, nb) @ B_cat.T -> (t, j, [c, k])
#                A-first: x as (t*nb, na) (x transposed per token) @ A_cat.T -> (t, l, [c, i])
#   mid operand  B-first: (t*mb, c*na), columns (c, j);  A-first: (t*ma, c*nb), columns (c, l)
#   output side  B-first: mid @ A rows (c, j) -> (t, k, i), transposed per token to (t, i, k)
#                A-first: mid @ B rows (c, l) -> (t, i, k)
# Only these per-token transposes move data; the rest are free reshapes.

def _x_operand(x_TN, factors, plan, ids):
    c, ma, na, mb, nb = _dims(factors, ids[0])
    x_Tjl = pad_last(x_TN, na * nb).reshape(-1, na, nb)
    if plan.a_first[ids[0]]:
        return x_Tjl.transpose(0, 2, 1).reshape(-1, na)
    return x_Tjl.reshape(-1, nb)


def _x_weight(factors, plan, ids):
    """(sum K, nb) of stacked B rows (c, k) for B-first, (sum K, na) of A rows (c, i) for A-first."""
    f = 0 if plan.a_first[ids[0]] else 1
    return _concat([factors[g][f].reshape(-1, factors[g][f].shape[2]) for g in ids], 0)


def _y_weight(factors, plan, ids):
    """(sum K, mb) of B.T rows (c, l) for A-first, (sum K, ma) of A.T rows (c, j) for B-first."""
    f = 1 if plan.a_first[ids[0]] else 0
    return _concat([factors[g][f].transpose(0, 2, 1).reshape(-1, factors[g][f].shape[1])
                    for g in ids], 0)


def _mid_operands(x_TN, factors, plan, x_sides):
    """Input-side matmuls: per group its mid operand (see the layout table above)."""
    t = x_TN.shape[0]
    mids = {}
    for ids in x_sides:
        out = _x_operand(x_TN, factors, plan, ids) @ _x_weight(factors, plan, ids).T
        off = 0
        for g in ids:
            c, ma, na, mb, nb = _dims(factors, g)
            rows, width = (nb, ma) if plan.a_first[g] else (na, mb)
            part = out[:, off:off + c * width].reshape(t, rows, c, width)
            mids[g] = part.transpose(0, 3, 2, 1).reshape(t * width, c * rows)
            off += c * width
    return mids


def _forward_chunk(x_TN, factors, plan, m):
    t = x_TN.shape[0]
    mids = _mid_operands(x_TN, factors, plan, plan.x_sides)
    y_TM = None
    for ids in plan.y_sides:
        c, ma, na, mb, nb = _dims(factors, ids[0])
        out = _concat([mids[g] for g in ids], 1) @ _y_weight(factors, plan, ids)
        if not plan.a_first[ids[0]]:
            out = out.reshape(t, mb, ma).transpose(0, 2, 1)
        part = out.reshape(t, ma * mb)[:, :m]
        y_TM = part if y_TM is None else y_TM + part
    return y_TM


def _backward_chunk(x_TN, dy_TM, factors, plan, n):
    """(dx, [(dA, dB)] in f32) of one chunk; the mid operands are recomputed, not stored."""
    t = x_TN.shape[0]
    mids = _mid_operands(x_TN, factors, plan, plan.x_sides)
    grads = [[None, None] for _ in factors]
    d_mids = {}
    for ids in plan.y_sides:
        c, ma, na, mb, nb = _dims(factors, ids[0])
        dy = pad_last(dy_TM, ma * mb)
        if plan.a_first[ids[0]]:
            dy = dy.reshape(t * ma, mb)
        else:
            dy = dy.reshape(t, ma, mb).transpose(0, 2, 1).reshape(t * mb, ma)
        d_mid = dy @ _y_weight(factors, plan, ids).T
        d_weight = (_concat([mids[g] for g in ids], 1).T @ dy).astype(jnp.float32)
        off = 0
        for g in ids:
            cg, mag, nag, mbg, nbg = _dims(factors, g)
            if plan.a_first[g]:    # rows (c, l), columns k -> dB (c, k, l)
                k, f, shape = cg * nbg, 1, (cg, nbg, mbg)
            else:                  # rows (c, j), columns i -> dA (c, i, j)
                k, f, shape = cg * nag, 0, (cg, nag, mag)
            grads[g][f] = d_weight[off:off + k].reshape(shape).transpose(0, 2, 1)
            d_mids[g] = d_mid[:, off:off + k]
            off += k
    dx_TN = None
    for ids in plan.x_sides:
        c, ma, na, mb, nb = _dims(factors, ids[0])
        parts = []
        for g in ids:
            cg, mag, nag, mbg, nbg = _dims(factors, g)
            rows, width = (nbg, mag) if plan.a_first[g] else (nag, mbg)
            part = d_mids[g].reshape(t, width, cg, rows).transpose(0, 3, 2, 1)
            parts.append(part.reshape(t * rows, cg * width))
        d_out = _concat(parts, 1)
        x_op = _x_operand(x_TN, factors, plan, ids)
        d_x = d_out @ _x_weight(factors, plan, ids)
        d_weight = (d_out.T @ x_op).astype(jnp.float32)
        off = 0
        for g in ids:
            cg, mag, nag, mbg, nbg = _dims(factors, g)
            k, f = (cg * mag, 0) if plan.a_first[g] else (cg * mbg, 1)
            grads[g][f] = d_weight[off:off + k].reshape(factors[g][f].shape)
            off += k
        if plan.a_first[ids[0]]:
            d_x = d_x.reshape(t, nb, na).transpose(0, 2, 1)
        part = d_x.reshape(t, na * nb)[:, :n]
        dx_TN = part if dx_TN is None else dx_TN + part
    return dx_TN, [tuple(g) for g in grads]


# ---- chunked driver with a hand-written backward ------------------------------------------

def _run_length(rows: int, length: int) -> int:
    """Tokens taken from each row per chunk: about TOKEN_CHUNK tokens in all."""
    return max(1, min(length, TOKEN_CHUNK // rows))


def _chunks(x_RSN, run: int):
    """((R, K, run, N), K): the S axis zero-padded to K runs of `run` tokens."""
    rows, length, width = x_RSN.shape
    k = -(-length // run)
    x_RSN = jnp.pad(x_RSN, ((0, 0), (0, k * run - length), (0, 0)))
    return x_RSN.reshape(rows, k, run, width), k


# Chunks are taken inside the loop (dynamic slices of the S axis) when there are several
# rows: slicing a leading token axis made XLA all-gather x and dy under a data-parallel
# mesh and run every device's chunks on every device. One row (a flat token axis, as in
# bench/adapter_ops.py) goes through lax.map / lax.scan over a leading chunk axis, which
# ran 10-20% faster on one CPU than the same loop with in-loop slices.

def _flat(x_RCN):
    return x_RCN.reshape(-1, x_RCN.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mixture(x_RSN, factors, plan: _Plan, m: int, n: int):
    rows, length, _ = x_RSN.shape
    run = _run_length(rows, length)
    if run == length:
        return _forward_chunk(_flat(x_RSN), factors, plan, m).reshape(rows, length, m)
    x_RKCN, k = _chunks(x_RSN, run)
    if rows == 1:
        y_KCM = lax.map(lambda x_CN: _forward_chunk(x_CN, factors, plan, m), x_RKCN[0])
        return y_KCM.reshape(1, -1, m)[:, :length]

    def step(i, y_RKCM):
        x_RCN = lax.dynamic_index_in_dim(x_RKCN, i, 1, False)
        y_RCM = _forward_chunk(_flat(x_RCN), factors, plan, m).reshape(rows, run, m)
        return lax.dynamic_update_index_in_dim(y_RKCM, y_RCM, i, 1)

    y_RKCM = lax.fori_loop(0, k, step, jnp.zeros((rows, k, run, m), x_RSN.dtype))
    return y_RKCM.reshape(rows, -1, m)[:, :length]


def _mixture_fwd(x_RSN, factors, plan, m, n):
    return _mixture(x_RSN, factors, plan, m, n), (x_RSN, factors)


def _mixture_bwd(plan, m, n, saved, dy_RSM):
    x_RSN, factors = saved
    rows, length, _ = x_RSN.shape
    run = _run_length(rows, length)
    zeros = [tuple(jnp.zeros(f.shape, jnp.float32) for f in pair) for pair in factors]
    add = functools.partial(jax.tree.map, jnp.add)
    if run == length:
        dx_TN, grads = _backward_chunk(_flat(x_RSN), _flat(dy_RSM), factors, plan, n)
        dx_RSN = dx_TN.reshape(x_RSN.shape)
    elif rows == 1:
        def step(acc, chunk):
            dx_CN, g = _backward_chunk(*chunk, factors, plan, n)
            return add(acc, g), dx_CN
        chunks = (_chunks(x_RSN, run)[0][0], _chunks(dy_RSM, run)[0][0])
        grads, dx_KCN = lax.scan(step, zeros, chunks)
        dx_RSN = dx_KCN.reshape(1, -1, n)[:, :length]
    else:
        (x_RKCN, k), (dy_RKCM, _) = _chunks(x_RSN, run), _chunks(dy_RSM, run)

        def step(i, carry):
            acc, dx_RKCN = carry
            x_RCN = lax.dynamic_index_in_dim(x_RKCN, i, 1, False)
            dy_RCM = lax.dynamic_index_in_dim(dy_RKCM, i, 1, False)
            dx_CN, g = _backward_chunk(_flat(x_RCN), _flat(dy_RCM), factors, plan, n)
            dx_RCN = dx_CN.reshape(rows, run, n).astype(dx_RKCN.dtype)
            return add(acc, g), lax.dynamic_update_index_in_dim(dx_RKCN, dx_RCN, i, 1)

        grads, dx_RKCN = lax.fori_loop(0, k, step, (zeros, jnp.zeros_like(x_RKCN)))
        dx_RSN = dx_RKCN.reshape(rows, -1, n)[:, :length]
    grads = tuple(tuple(g.astype(f.dtype) for g, f in zip(gp, fp))
                  for gp, fp in zip(grads, factors))
    return dx_RSN.astype(x_RSN.dtype), grads


_mixture.defvjp(_mixture_fwd, _mixture_bwd)


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
