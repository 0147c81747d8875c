"""Best fits of a given update dW by each parameterisation: Kronecker SVD (Van Loan-Pitsianis),
a MoKA mixture (SVD start + joint refinement), LoRA (truncated SVD); and the effective rank.

    A, B, rest = kron_svd_fit(dW, ((ma, na), (mb, nb)))     # kron(A, B)[:m, :n] ~ dW
    factors = moka_from_delta(dW, shapes, scale=2.0)        # MoKA's parameter layout
    load_into(model_layer.adapter, factors)                 # an attached MoKA (or LoRA) adapter

The rearrangement (Van Loan & Pitsianis 1993). For A: (ma, na), B: (mb, nb),
kron(A, B)[i*mb + k, j*nb + l] = A[i, j] * B[k, l], so the row-major rearrangement

    R(P)[(i, j), (k, l)] = P[i*mb + k, j*nb + l]        R(P): (ma*na, mb*nb)

maps kron(A, B) to the rank-1 matrix vec(A) vec(B)^T and keeps the Frobenius norm. The best
single product of an (ma*mb, na*nb) matrix is the leading singular pair of R, its error
sqrt(sum_{i>1} sigma_i^2); the best sum of k products of one shape is R's rank-k truncation.

Padding (ma*mb > m or na*nb > n). The fitted weight is kron(A, B)[:m, :n], so the product's
entries outside (m, n) are free. R of the zero-padded matrix gives the exact optimum of the
stricter problem "product = 0 there"; we start from it and then refine by alternating least
squares on the real entries only (each side's rows solved exactly with the other side
fixed: a low-rank fit with missing entries, whose padded entries come out as the fit
extends them). Each round can only lower the error on the real entries, so the result is
never worse than the zero-padded fit; it is a stationary point, not a certified global
optimum (a masked low-rank fit has no closed form). Exact splits, the planner's preference,
need none of this.

All SVD fits run in float64 numpy; the MoKA refinement in float32 JAX.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moka_jax.core import shapes as shapes_lib

KronShape = shapes_lib.KronShape

# Alternating least-squares rounds for padded shapes: stop when the error falls by less than
# PAD_TOL (relative) in a round, or after PAD_ITERS rounds.
PAD_ITERS = 500
PAD_TOL = 1e-13
# Rearranged matrices with a side up to this use a full SVD (Lanczos above).
FULL_SVD_BELOW = 64

__all__ = ["effective_rank", "greedy_kron_start", "kron_rearrange", "kron_svd_fit",
           "kron_svd_fit_sum", "kron_unrearrange", "load_into", "lora_svd_fit", "moka_delta",
           "moka_from_delta", "spectrum_effective_rank"]


# ---- the rearrangement ----------------------------------------------------------------------

def _shape(shape) -> KronShape:
    (ma, na), (mb, nb) = shape
    return (int(ma), int(na)), (int(mb), int(nb))


def kron_rearrange(w, shape):
    """R(w): the (m, n) matrix w, zero-padded to (ma*mb, na*nb), as (ma*na, mb*nb)."""
    (ma, na), (mb, nb) = _shape(shape)
    w = np.asarray(w)
    m, n = w.shape
    p = np.zeros((ma * mb, na * nb), w.dtype)
    p[:m, :n] = w
    return p.reshape(ma, mb, na, nb).transpose(0, 2, 1, 3).reshape(ma * na, mb * nb)


def kron_unrearrange(r, shape, m: int, n: int):
    """The inverse of kron_rearrange, truncated to (m, n)."""
    (ma, na), (mb, nb) = _shape(shape)
    p = np.asarray(r).reshape(ma, na, mb, nb).transpose(0, 2, 1, 3).reshape(ma * mb, na * nb)
    return p[:m, :n]


def _rearranged_fit(w, shape, k: int):
    """(u_k, s_k, vt_k, error) of the best rank-k fit of R(w) on w's real entries."""
    w = np.asarray(w, np.float64)
    if w.ndim != 2:
        raise ValueError(f"kron fit: expected an (m, n) matrix, got shape {w.shape}")
    m, n = w.shape
    shape = shapes_lib.validate_kron_shapes([_shape(shape)], m, n, "kron fit")[0]
    r = kron_rearrange(w, shape)
    if not 1 <= k <= min(r.shape):
        raise ValueError(f"kron fit: k = {k} products of shape {shape}; the rearranged "
                         f"{r.shape} matrix allows 1 <= k <= {min(r.shape)}")
    u, s, vt = _top_svd(r, k)
    (ma, na), (mb, nb) = shape
    if ma * mb == m and na * nb == n:
        # = sqrt(sum_{i>k} sigma_i^2), taken from the residual: no cancellation when small
        err = float(np.linalg.norm(r - (u * s) @ vt))
        return u, s, vt, err
    mask = kron_rearrange(np.ones((m, n), bool), shape).astype(np.float64)
    root = np.sqrt(s[:k])
    left, right = u[:, :k] * root, vt[:k].T * root  # R ~ left @ right.T
    err = _masked_error(r, mask, left, right)
    for _ in range(PAD_ITERS):
        left2 = _masked_ls(r, mask, right)
        right2 = _masked_ls(r.T, mask.T, left2)
        err2 = _masked_error(r, mask, left2, right2)
        if err2 > err:  # cannot happen in exact arithmetic; guards round-off
            break
        done = err - err2 <= PAD_TOL * max(err, 1e-300)
        left, right, err = left2, right2, err2
        if done:
            break
    # Back to SVD form (orthonormal u, v; largest first) through the two thin QRs.
    qa, ra = np.linalg.qr(left)
    qb, rb = np.linalg.qr(right)
    uc, s, vct = np.linalg.svd(ra @ rb.T)
    return qa @ uc, s, (qb @ vct.T).T, err


def _top_svd(r, k: int):
    """The k leading singular triplets, largest first. Full LAPACK SVD for small matrices or
    large k; otherwise Lanczos (ARPACK, tol 0: converged to machine precision) from a fixed
    start vector, ~10x faster on a 576 x 576 rearrangement and deterministic."""
    if min(r.shape) <= FULL_SVD_BELOW or k >= min(r.shape) // 4:
        u, s, vt = np.linalg.svd(r, full_matrices=False)
        return u[:, :k], s[:k], vt[:k]
    from scipy.sparse.linalg import svds

    v0 = np.random.default_rng(0).normal(size=min(r.shape))
    u, s, vt = svds(r, k=k, tol=0, v0=v0, solver="arpack")
    order = np.argsort(s)[::-1]
    return u[:, order], s[order], vt[order]


def _masked_error(r, mask, left, right) -> float:
    return float(np.linalg.norm(mask * (r - left @ right.T)))


def _masked_ls(r, mask, right):
    """Rows p of `left` minimising sum_q mask_pq (r_pq - left_p . right_q)^2, given right.
    A row with nothing observed (a block wholly in the padding) gets 0 (the tiny ridge)."""
    q, k = right.shape
    # mask @ (per-column outer products): a (p, k*k) matmul, never a (p, q, k, k) array
    gram = (mask @ (right[:, :, None] * right[:, None, :]).reshape(q, k * k)).reshape(-1, k, k)
    rhs = (mask * r) @ right
    ridge = 1e-12 * max(float(np.trace(right.T @ right)), 1e-300)
    return np.linalg.solve(gram + ridge * np.eye(k), rhs[..., None])[..., 0]


def _factors(u, s, vt, shape):
    """Stacked (k, ma, na), (k, mb, nb) factors; sqrt(sigma) on each side balances norms."""
    (ma, na), (mb, nb) = _shape(shape)
    root = np.sqrt(s)
    a = (u * root).T.reshape(-1, ma, na)
    b = (vt * root[:, None]).reshape(-1, mb, nb)
    return a, b


def kron_svd_fit(w, shape):
    """(A, B, rest): the best single Kronecker product, kron(A, B)[:m, :n] ~ w (m, n).

    rest = ||w - kron(A, B)[:m, :n]||_F: for an exact split, sqrt of the sum of the
    rearranged matrix's non-leading squared singular values (the optimum); for a padded
    shape, see the module docstring. ||A||_F = ||B||_F. Float64 numpy arrays.
    """
    a, b, rest = kron_svd_fit_sum(w, shape, 1)
    return a[0], b[0], rest


def kron_svd_fit_sum(w, shape, k: int):
    """(A (k, ma, na), B (k, mb, nb), rest): the best sum of k Kronecker products of one
    shape, sum_i kron(A_i, B_i)[:m, :n] ~ w, by the rank-k truncation of the rearrangement
    (largest first); rest as kron_svd_fit."""
    u, s, vt, err = _rearranged_fit(w, shape, int(k))
    a, b = _factors(u, s, vt, shape)
    return a, b, err


# ---- LoRA and the effective rank ------------------------------------------------------------

def lora_svd_fit(w, r: int):
    """(B (m, r), A (r, n), rest): the truncated SVD, the best rank-r fit B @ A ~ w
    (Eckart-Young), rest = ||w - B @ A||_F = sqrt(sum_{i>r} sigma_i^2); sqrt(sigma) on each side.
    A LoRA adapter with scaling alpha / r holds lora_b = B / sqrt(scaling), lora_a = A / sqrt(scaling)."""
    w = np.asarray(w, np.float64)
    if not 1 <= r <= min(w.shape):
        raise ValueError(f"lora_svd_fit: r = {r}; a {w.shape} matrix allows 1 <= r <= "
                         f"{min(w.shape)}")
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r], math.sqrt(float(np.sum(s[r:] ** 2)))


def effective_rank(w) -> float:
    """exp(H(p)), p_i = sigma_i / sum_j sigma_j, H the Shannon entropy (nats): the effective
    rank of Roy & Vetterli (2007). n for an n x n multiple of the identity (any matrix with n
    equal non-zero singular values), 1 for rank 1, 0 for the zero matrix."""
    return spectrum_effective_rank(np.linalg.svd(np.asarray(w, np.float64), compute_uv=False))


def spectrum_effective_rank(s) -> float:
    """effective_rank from the singular values s (when they are already known)."""
    s = np.asarray(s, np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


# ---- MoKA from a given update ---------------------------------------------------------------

def _groups(shapes):
    from moka_jax.adapters.moka import component_groups
    return component_groups(shapes)


def moka_delta(factors, m: int, n: int):
    """dW = scale * sum_i softmax(g)_i kron(A_i, B_i)[:m, :n] of a factors dict (as MoKA's
    delta_weight; 1/r weights when factors["g"] is None), as a float64 numpy array."""
    shapes = factors["shapes"]
    r = len(shapes)
    g = factors.get("g")
    alpha = np.full(r, 1.0 / r) if g is None else np.asarray(jax.nn.softmax(
        jnp.asarray(g, jnp.float32)), np.float64)
    dw = np.zeros((m, n))
    for ids, a, b in zip(_groups(shapes).values(), factors["a"], factors["b"]):
        for j, i in enumerate(ids):
            dw += alpha[i] * np.kron(np.asarray(a[j], np.float64),
                                     np.asarray(b[j], np.float64))[:m, :n]
    return factors["scale"] * dw


def _mixture(params, groups, r: int, m: int, n: int, gated: bool):
    """sum_i w_i kron(A_i, B_i)[:m, :n], w_i = r * softmax(g)_i (1 at g = 0)."""
    w = r * jax.nn.softmax(params["g"]) if gated else jnp.ones((r,), jnp.float32)
    out = jnp.zeros((m, n), jnp.float32)
    for ids, a, b in zip(groups, params["a"], params["b"]):
        (c, ma, na), (_, mb, nb) = a.shape, b.shape
        # Broadcast products are kron's own layout (ma, mb, na, nb): one fused elementwise
        # loop, no transpose (an einsum to 'ikjl' ran ~10x slower on the CPU).
        for j, i in enumerate(ids):  # one product at a time: a sum over c fused slower
            p = (w[i] * a[j])[:, None, :, None] * b[j][None, :, None, :]
            out = out + p.reshape(ma * mb, na * nb)[:m, :n]
    return out


@functools.partial(jax.jit, static_argnames=("groups", "r", "steps", "lr", "gated"))
def _refine(target, params, *, groups, r: int, steps: int, lr: float, gated: bool):
    """Adam on ||target - mixture||^2 from params; returns the best params seen (the start
    included) and the loss history (start, then after each step). Jitted once per shapes,
    steps and lr: fitting many layers of one kind compiles once."""
    import optax

    m, n = target.shape
    opt = optax.adam(lr)

    def loss_fn(p):
        return jnp.sum((target - _mixture(p, groups, r, m, n, gated)) ** 2)

    def keep_better(p, loss, best_p, best_l):
        better = loss < best_l
        return (jax.tree.map(lambda x, y: jnp.where(better, x, y), p, best_p),
                jnp.minimum(loss, best_l))

    def step(carry, _):
        p, state, best_p, best_l = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        best_p, best_l = keep_better(p, loss, best_p, best_l)  # the loss of p, before the update
        if not gated:
            grads = {**grads, "g": jnp.zeros_like(grads["g"])}
        updates, state = opt.update(grads, state, p)
        return (optax.apply_updates(p, updates), state, best_p, best_l), loss

    carry = (params, opt.init(params), params, jnp.asarray(jnp.inf, jnp.float32))
    (p_last, _, best_p, best_l), losses = jax.lax.scan(step, carry, None, length=steps)
    last = loss_fn(p_last)
    best_p, _ = keep_better(p_last, last, best_p, best_l)
    return best_p, jnp.concatenate([losses, last[None]])


def greedy_kron_start(w, shapes):
    """[(A_i, B_i)]: component by component, the best single product of shape i
    (kron_svd_fit) for what components 0..i-1 left of w. Components of one shape take the
    rearrangement's successive singular pairs, so a prefix of the list is the greedy start of
    that prefix of shapes (the planner's shapes for a smaller budget are such a prefix)."""
    w = np.asarray(w, np.float64)
    m, n = w.shape
    comps, resid = [], w.copy()
    for shape in shapes_lib.validate_kron_shapes(shapes, m, n, "greedy_kron_start"):
        a, b, _ = kron_svd_fit(resid, shape)
        comps.append((a, b))
        resid = resid - np.kron(a, b)[:m, :n]
    return comps


def moka_from_delta(w, shapes, *, scale: float | None = None, steps: int = 300,
                    lr: float = 3e-3, fit_gates: bool = False, start=None,
                    return_info: bool = False):
    """MoKA factors approximating a given update w (m, n) = (out, in) with the given shapes.

    Start: greedy residual Kronecker SVD (greedy_kron_start; or `start`, a list of (A_i, B_i)
    with sum_i kron(A_i, B_i)[:m, :n] the starting fit of w, e.g. a prefix of a longer greedy
    run). Then Adam (lr, steps) refines all factors jointly on ||w - dW||_F^2, taken on
    w / ||w||_F so lr does not depend on w's scale, and keeps the best iterate: the result is
    never worse than the start (steps=0: the start). The defaults come from a sweep on
    576 x 576 and 192 x 576 targets with 4 and 16 components (lr 3e-4 / 1e-3 / 3e-3, 200
    steps): 3e-3 was fastest, and 50 steps reached nearly all of what 200 did. fit_gates:
    train the gate logits g too (they only rescale components, so the fit gains little; they
    start and, if not trained, stay at 0, i.e. alpha = 1/r as MoKA's init).

    A component whose best product is zero (w has no more structure of its shape) comes
    back as A = B = 0, a point where training cannot move it (each factor's gradient is
    proportional to the other); w = 0 is refused (MoKA's own init already gives dW = 0).

    Returns {"a": [(c, ma, na) per group], "b": [(c, mb, nb) per group], "g": (r,),
    "shapes": shapes, "scale": scale} in MoKA's layout (groups of equal shape in first-
    appearance order, adapters.moka.component_groups), such that
    scale * sum_i softmax(g)_i kron(A_i, B_i)[:m, :n] ~ w. load_into puts them in an adapter.
    With return_info: (factors, {"rel_error_start", "rel_error", "losses"}).
    """
    from moka_jax.adapters.moka import DEFAULT_SCALE

    scale = DEFAULT_SCALE if scale is None else float(scale)
    w = np.asarray(w, np.float64)
    m, n = w.shape
    shapes = shapes_lib.validate_kron_shapes(shapes, m, n, "moka_from_delta")
    r = len(shapes)
    norm = float(np.linalg.norm(w))
    if not norm > 0:
        raise ValueError("moka_from_delta: w is zero (or not finite); MoKA's own init "
                         "(A Kaiming-uniform, B = 0) already gives dW = 0")
    target = w / norm
    if start is None:
        comps = greedy_kron_start(target, shapes)
    else:  # in w's units: each factor takes 1 / sqrt(norm)
        if len(start) != r:
            raise ValueError(f"moka_from_delta: start has {len(start)} components, shapes {r}")
        root = math.sqrt(norm)
        comps = [(np.asarray(a) / root, np.asarray(b) / root) for a, b in start]
    fit = sum(np.kron(a, b)[:m, :n] for a, b in comps)
    start_err = float(np.linalg.norm(target - fit))
    groups = [tuple(ids) for ids in _groups(shapes).values()]
    params = {"a": [jnp.asarray(np.stack([comps[i][0] for i in ids]), jnp.float32)
                    for ids in groups],
              "b": [jnp.asarray(np.stack([comps[i][1] for i in ids]), jnp.float32)
                    for ids in groups],
              "g": jnp.zeros((r,), jnp.float32)}
    losses = np.asarray([start_err ** 2])
    if steps > 0:
        params, hist = _refine(jnp.asarray(target, jnp.float32), params, groups=tuple(groups),
                               r=r, steps=int(steps), lr=float(lr), gated=bool(fit_gates))
        losses = np.asarray(hist, np.float64)
    # scale * softmax(g)_i * kron(A'_i, B'_i) = norm * r * softmax(g)_i * kron(A_i, B_i)
    c = math.sqrt(norm * r / scale)
    factors = {"a": [np.asarray(a, np.float32) * c for a in params["a"]],
               "b": [np.asarray(b, np.float32) * c for b in params["b"]],
               "g": np.asarray(params["g"], np.float32), "shapes": shapes, "scale": scale}
    if not return_info:
        return factors
    final = float(np.linalg.norm(w - moka_delta(factors, m, n))) / norm
    # start_err and losses are already relative: they were taken on w / ||w||.
    return factors, {"rel_error_start": start_err, "rel_error": final, "losses": losses}


# ---- loading into an attached adapter -------------------------------------------------------

def _set(var, value, where: str):
    value = jnp.asarray(value)
    old = var.get_value()
    if tuple(old.shape) != tuple(value.shape):
        raise ValueError(f"load_into: {where} has shape {tuple(old.shape)}, the factors "
                         f"{tuple(value.shape)}")
    var.set_value(value.astype(old.dtype))


def load_into(adapter, factors: dict[str, Any]) -> None:
    """Write fitted factors into an attached adapter in place.

    MoKA (gated or ungated): factors from moka_from_delta with the adapter's shapes (in its
    order). A different adapter scale, or an ungated adapter given trained gates, is folded
    into A so the adapter's dW equals moka_delta(factors). LoRA: {"lora_b": B, "lora_a": A}
    with lora_b @ lora_a the wanted dW (lora_svd_fit's B, A); the adapter's alpha / r is
    divided out. Example: load_into(model.layers[0].attn.q_proj.adapter, factors).
    """
    from moka_jax.adapters.lora import DoRA, LoRA
    from moka_jax.adapters.moka import MoKA

    if isinstance(adapter, MoKA):
        if tuple(map(tuple, factors["shapes"])) != tuple(adapter.shapes):
            raise ValueError(f"load_into: the factors have shapes {factors['shapes']}, the "
                             f"adapter {list(adapter.shapes)}; fit with the adapter's shapes")
        r = adapter.r
        g = np.zeros(r, np.float32) if factors.get("g") is None else np.asarray(factors["g"])
        fold = np.full(r, factors["scale"] / adapter.scale)
        if not adapter.gated:  # alpha is 1/r there: fold r * softmax(g) into A
            fold = fold * r * np.asarray(jax.nn.softmax(jnp.asarray(g, jnp.float32)))
        for k, ids in enumerate(adapter.group_index):
            a = np.asarray(factors["a"][k]) * fold[list(ids)][:, None, None]
            _set(adapter.a[k], a, f"a[{k}]")
            _set(adapter.b[k], factors["b"][k], f"b[{k}]")
        if adapter.gated:
            _set(adapter.g, g, "g")
        return
    if isinstance(adapter, DoRA):
        raise TypeError("load_into: DoRA rescales each row of W0 + dW by its magnitude vector, "
                        "so loading a dW fit into its LoRA factors would not give that dW")
    if isinstance(adapter, LoRA):
        s = math.sqrt(adapter.scaling)
        _set(adapter.lora_b, np.asarray(factors["lora_b"]) / s, "lora_b")
        _set(adapter.lora_a, np.asarray(factors["lora_a"]) / s, "lora_a")
        return
    raise TypeError(f"load_into: {type(adapter).__name__} is not a MoKA or LoRA adapter")
