"""float64 numpy reference of every adapter: dW, and the gradients of L = <y, cot>.

Written from the formulas of DESIGN.md section 1, independently of kron.py: dW is materialised
with np.kron, and the factor gradients come from dL/d(dW) = cot.T @ x by the product rule.
"""

from __future__ import annotations

import numpy as np

from moka_jax.adapters import DoRA, LoRA, MoKA, MoKAs


def f64(v):
    return np.asarray(v, np.float64)


def _alpha(adapter):
    if not adapter.gated:
        return np.full(adapter.r, 1.0 / adapter.r)
    g = f64(adapter.g[...])
    e = np.exp(g - g.max())
    return e / e.sum()


def _gate_grad(adapter, d_alpha):
    """dL/dg from dL/dalpha through alpha = softmax(g); None when ungated."""
    if not adapter.gated:
        return None
    alpha = _alpha(adapter)
    return alpha * (d_alpha - alpha @ d_alpha)


def _pad(g_mn, rows, cols):
    out = np.zeros((rows, cols))
    out[:g_mn.shape[0], :g_mn.shape[1]] = g_mn
    return out


def delta_weight(adapter) -> np.ndarray:
    """dW (m, n) of MoKA / MoKAs / LoRA (for DoRA its LoRA part; the layer: dora_weight)."""
    m, n = adapter.m, adapter.n
    if isinstance(adapter, MoKA):
        alpha = _alpha(adapter) * adapter.scale
        return sum(alpha[i] * np.kron(f64(a), f64(b))[:m, :n]
                   for i, (a, b) in enumerate(adapter.components()))
    if isinstance(adapter, MoKAs):
        alpha = _alpha(adapter) * adapter.scale
        dw = 0
        for i, c in enumerate(adapter.c):
            k = -(-n // c.shape[1])
            dw = dw + alpha[i] * np.kron(np.eye(k), f64(c[...]))[:m, :n]
        return dw
    if isinstance(adapter, LoRA):
        return adapter.scaling * f64(adapter.lora_b[...]) @ f64(adapter.lora_a[...])
    raise TypeError(type(adapter).__name__)


def dora_weight(adapter: DoRA, w0) -> tuple[np.ndarray, np.ndarray]:
    """(W' = W0 + dW, s = magnitude / ||W'|| per row): the layer is y = s * (x @ W'.T)."""
    w = f64(w0) + delta_weight(adapter)
    return w, f64(adapter.magnitude[...]) / np.linalg.norm(w, axis=1)


def grads(adapter, x, cot, w0=None) -> tuple[np.ndarray, dict]:
    """(dL/dx, {param name: dL/dparam}) for L = sum(cot * y), y = the adapter's delta (or, for
    DoRA, the whole layer on the base weight w0). Names follow the module's attributes;
    stacked MoKA factors are returned stacked, as the module stores them."""
    x2, cot2 = f64(x).reshape(-1, adapter.n), f64(cot).reshape(-1, adapter.m)
    m, n = adapter.m, adapter.n
    if isinstance(adapter, DoRA):
        w, s = dora_weight(adapter, w0)
        g_w = s[:, None] * (cot2.T @ x2)     # the norm is a constant (stop_gradient), as PEFT
        d_mag = np.sum(cot2 * (x2 @ w.T), axis=0) / np.linalg.norm(w, axis=1)
        dx = (cot2 * s) @ w
        return dx.reshape(np.shape(x)), {**_lora_grads(adapter, g_w), "magnitude": d_mag}
    dw = delta_weight(adapter)
    g = cot2.T @ x2                          # dL/d(dW), (m, n)
    dx = (cot2 @ dw).reshape(np.shape(x))
    if isinstance(adapter, LoRA):
        return dx, _lora_grads(adapter, g)
    alpha = _alpha(adapter) * adapter.scale
    if isinstance(adapter, MoKAs):
        d_c, d_alpha = [], np.zeros(adapter.r)
        for i, c in enumerate(adapter.c):
            q, p = c.shape
            k = -(-n // p)
            gp = _pad(g, k * q, k * p).reshape(k, q, k, p)
            d_c.append(alpha[i] * np.einsum("bqbp->qp", gp))
            d_alpha[i] = adapter.scale * np.sum(g * np.kron(np.eye(k), f64(c[...]))[:m, :n])
        return dx, {"c": d_c, "g": _gate_grad(adapter, d_alpha)}
    d_a, d_b, d_alpha = [None] * adapter.r, [None] * adapter.r, np.zeros(adapter.r)
    for i, (a, b) in enumerate(adapter.components()):
        a, b = f64(a), f64(b)
        (ma, na), (mb, nb) = a.shape, b.shape
        gp = _pad(g, ma * mb, na * nb).reshape(ma, mb, na, nb)  # kron index (i k), (j l)
        d_a[i] = alpha[i] * np.einsum("ikjl,kl->ij", gp, b)
        d_b[i] = alpha[i] * np.einsum("ikjl,ij->kl", gp, a)
        d_alpha[i] = adapter.scale * np.sum(g * np.kron(a, b)[:m, :n])
    stack = lambda per: [np.stack([per[i] for i in ids]) for ids in adapter.group_index]
    return dx, {"a": stack(d_a), "b": stack(d_b), "g": _gate_grad(adapter, d_alpha)}


def _lora_grads(adapter, g_dw):
    s = adapter.scaling
    a, b = f64(adapter.lora_a[...]), f64(adapter.lora_b[...])
    return {"lora_a": s * b.T @ g_dw, "lora_b": s * g_dw @ a.T}
