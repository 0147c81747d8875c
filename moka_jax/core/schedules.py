"""The two schedules of kron.kron_mixture_apply: one batched contraction, or chunks of tokens.

Both compute the same sum over groups of stacked factor pairs (A_CIJ, B_CKL), each group in the
contraction order its plan picks (kron_flops), and both round alike: every contraction takes
operands in the compute dtype and accumulates in f32 (`preferred_element_type`); a mid
operand is rounded to the compute dtype because it is the next matmul's input; the group sum
stays in f32; the caller's output dtype is applied once, at the end.

- batched: the einsum of DESIGN.md section 1 over every token at once, plain JAX (any
  transformation, forward-mode AD included). One contraction rather than large chunks: at
  8 x 512 tokens each einsum is already a batched matmul of thousands of rows, which fills a
  GPU, while any loop over chunks runs its steps one after the other. jax.checkpoint makes its
  backward recompute the mid operands instead of storing them (about 3x x's size per adapter
  at LLaMA-7B shapes), so like the chunked one it keeps only x. Its x-gradient rounds each
  group's share to the compute dtype before the f32 sum (autodiff gives a cotangent its
  primal's dtype): in bf16 1.6x a dense matmul's error against 1.4x for the chunked one.
- chunked: about TOKEN_CHUNK tokens a step with a hand-written backward (custom_vjp, reverse
  mode only); groups that split x or y the same way share one 2-D matmul. Measured on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from einops import rearrange
from jax import lax

# Tokens per step of the chunked schedule. A chunk's intermediates stay in the L2 cache, and
# XLA allocates only chunk-sized temporaries: on CPU every fresh multi-MB buffer costs page
# faults on each call. On 4096x4096 and 4096->1024 (bench/adapter_ops.py) chunks of 64..256
# tokens were equally fast; one chunk of 2048 was 10-25% slower.
TOKEN_CHUNK = 64


def pad_last(x, size: int):
    """Zero-pad the last axis of x up to `size` (no-op when already that size)."""
    extra = size - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def kron_flops(a_shape, b_shape) -> tuple[int, int]:
    """Per-token flops of the two contraction orders: (B first, A first)."""
    (ma, na), (mb, nb) = a_shape, b_shape
    return 2 * mb * na * (nb + ma), 2 * ma * nb * (na + mb)


def accumulation_dtype(dtype):
    """f32, or the compute dtype when it is wider (f64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _mm(a, b):
    return jnp.matmul(a, b, preferred_element_type=accumulation_dtype(a.dtype))


# ---- plan: contraction order per group, and which groups share a matmul -------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    a_first: tuple[bool, ...]               # per group: contract A (over na) first
    x_sides: tuple[tuple[int, ...], ...]    # groups sharing (order, na, nb): one input matmul
    y_sides: tuple[tuple[int, ...], ...]    # groups sharing (order, ma, mb): one output matmul


def make_plan(shapes) -> Plan:
    """shapes: per group ((c, ma, na), (c, mb, nb))."""
    a_first, x_sides, y_sides = [], {}, {}
    for g, ((_, ma, na), (_, mb, nb)) in enumerate(shapes):
        b_cost, a_cost = kron_flops((ma, na), (mb, nb))
        a_first.append(a_cost < b_cost)
        x_sides.setdefault((a_first[-1], na, nb), []).append(g)
        y_sides.setdefault((a_first[-1], ma, mb), []).append(g)
    return Plan(tuple(a_first), tuple(map(tuple, x_sides.values())),
                tuple(map(tuple, y_sides.values())))


def _cast(factors, dtype):
    return tuple((a.astype(dtype), b.astype(dtype)) for a, b in factors)


# ---- batched: one contraction over all tokens ---------------------------------------------

@functools.partial(jax.checkpoint, static_argnums=(2, 3, 4))
def batched(x, factors, plan: Plan, m: int, out_dtype):
    """y (..., m) in out_dtype; x (..., n) in the compute dtype; factors in any float dtype."""
    dtype, acc = x.dtype, accumulation_dtype(x.dtype)
    # Each group's cotangent of x arrives rounded to x.dtype; taking every group's copy of x
    # from one f32 x makes autodiff sum those cotangents in f32, as the forward sums groups.
    x_acc = x.astype(acc)
    y = None
    for (a_cij, b_ckl), a_first in zip(_cast(factors, dtype), plan.a_first):
        na, nb = a_cij.shape[2], b_ckl.shape[2]
        x_jl = rearrange(pad_last(x_acc, na * nb), "... (j l) -> ... j l", j=na).astype(dtype)
        if a_first:
            z = jnp.einsum("cij,...jl->...cil", a_cij, x_jl, preferred_element_type=acc)
            y_ik = jnp.einsum("...cil,ckl->...ik", z.astype(dtype), b_ckl,
                              preferred_element_type=acc)
        else:
            z = jnp.einsum("...jl,ckl->...cjk", x_jl, b_ckl, preferred_element_type=acc)
            y_ik = jnp.einsum("cij,...cjk->...ik", a_cij, z.astype(dtype),
                              preferred_element_type=acc)
        part = rearrange(y_ik, "... i k -> ... (i k)")[..., :m]
        y = part if y is None else y + part
    return y.astype(out_dtype)


# ---- chunked: the per-chunk math as 2-D matmuls ---------------------------------------------

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
        out = _mm(_x_operand(x_TN, factors, plan, ids), _x_weight(factors, plan, ids).T)
        out = out.astype(x_TN.dtype)
        off = 0
        for g in ids:
            c, ma, na, mb, nb = _dims(factors, g)
            rows, width = (nb, ma) if plan.a_first[g] else (na, mb)
            part = out[:, off:off + c * width].reshape(t, rows, c, width)
            mids[g] = part.transpose(0, 3, 2, 1).reshape(t * width, c * rows)
            off += c * width
    return mids


def _forward_chunk(x_TN, factors, plan, m):
    """y (t, m) in f32 of one chunk; x and factors in the compute dtype."""
    t = x_TN.shape[0]
    mids = _mid_operands(x_TN, factors, plan, plan.x_sides)
    y_TM = None
    for ids in plan.y_sides:
        c, ma, na, mb, nb = _dims(factors, ids[0])
        out = _mm(_concat([mids[g] for g in ids], 1), _y_weight(factors, plan, ids))
        if not plan.a_first[ids[0]]:
            out = out.reshape(t, mb, ma).transpose(0, 2, 1)
        part = out.reshape(t, ma * mb)[:, :m]
        y_TM = part if y_TM is None else y_TM + part
    return y_TM


def _backward_chunk(x_TN, dy_TM, factors, plan, n):
    """(dx, [(dA, dB)]) of one chunk, all f32; the mid operands are recomputed, not stored."""
    t, dtype = x_TN.shape[0], x_TN.dtype
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
        d_mid = _mm(dy, _y_weight(factors, plan, ids).T).astype(dtype)
        d_weight = _mm(_concat([mids[g] for g in ids], 1).T, dy)
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
        d_x = _mm(d_out, _x_weight(factors, plan, ids))
        d_weight = _mm(d_out.T, x_op)
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def chunked(x_RSN, factors, plan: Plan, m: int, n: int, out_dtype):
    """y (R, S, m) in out_dtype; x (R, S, n) in the compute dtype; factors in any float dtype."""
    rows, length, _ = x_RSN.shape
    factors = _cast(factors, x_RSN.dtype)
    run = _run_length(rows, length)

    def forward(x_CN):
        return _forward_chunk(x_CN, factors, plan, m).astype(out_dtype)

    if run == length:
        return forward(_flat(x_RSN)).reshape(rows, length, m)
    x_RKCN, k = _chunks(x_RSN, run)
    if rows == 1:
        return lax.map(forward, x_RKCN[0]).reshape(1, -1, m)[:, :length]

    def step(i, y_RKCM):
        x_RCN = lax.dynamic_index_in_dim(x_RKCN, i, 1, False)
        y_RCM = forward(_flat(x_RCN)).reshape(rows, run, m)
        return lax.dynamic_update_index_in_dim(y_RKCM, y_RCM, i, 1)

    y_RKCM = lax.fori_loop(0, k, step, jnp.zeros((rows, k, run, m), out_dtype))
    return y_RKCM.reshape(rows, -1, m)[:, :length]


def _chunked_fwd(x_RSN, factors, plan, m, n, out_dtype):
    return chunked(x_RSN, factors, plan, m, n, out_dtype), (x_RSN, factors)


def _chunked_bwd(plan, m, n, out_dtype, saved, dy_RSM):
    x_RSN, saved_factors = saved
    factors = _cast(saved_factors, x_RSN.dtype)
    dy_RSM = dy_RSM.astype(x_RSN.dtype)  # a matmul operand: the compute dtype
    rows, length, _ = x_RSN.shape
    run = _run_length(rows, length)
    acc = accumulation_dtype(x_RSN.dtype)
    zeros = [tuple(jnp.zeros(f.shape, acc) for f in pair) for pair in factors]
    add = functools.partial(jax.tree.map, jnp.add)

    def backward(x_CN, dy_CM):
        dx_CN, grads = _backward_chunk(x_CN, dy_CM, factors, plan, n)
        return dx_CN.astype(x_RSN.dtype), grads

    if run == length:
        dx_TN, grads = backward(_flat(x_RSN), _flat(dy_RSM))
        dx_RSN = dx_TN.reshape(x_RSN.shape)
    elif rows == 1:
        def step(acc, chunk):
            dx_CN, g = backward(*chunk)
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
            dx_CN, g = backward(_flat(x_RCN), _flat(dy_RCM))
            dx_RCN = dx_CN.reshape(rows, run, n)
            return add(acc, g), lax.dynamic_update_index_in_dim(dx_RKCN, dx_RCN, i, 1)

        grads, dx_RKCN = lax.fori_loop(0, k, step, (zeros, jnp.zeros_like(x_RKCN)))
        dx_RSN = dx_RKCN.reshape(rows, -1, n)[:, :length]
    grads = tuple(tuple(g.astype(f.dtype) for g, f in zip(gp, fp))
                  for gp, fp in zip(grads, saved_factors))
    return dx_RSN, grads


chunked.defvjp(_chunked_fwd, _chunked_bwd)
