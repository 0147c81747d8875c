"""PyTorch reference of the adapters (MoKA, ungated MoKA, MoKAs, LoRA), for parity and speed.

Written independently of kron.py: the factored forward uses torch.einsum over per-component
factors (no grouping), and `delta_weight` materialises with torch.kron. torch is optional:
importing this module needs it, nothing else in moka_jax does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _factored(x, a, b, m: int, n: int):
    (ma, na), (mb, nb) = a.shape, b.shape
    x = F.pad(x, (0, na * nb - n)).reshape(*x.shape[:-1], na, nb)
    y = torch.einsum("ij,...jl,kl->...ik", a, x, b)
    return y.reshape(*y.shape[:-2], ma * mb)[..., :m]


class _GatedMixture(nn.Module):
    """The static gate shared by MoKA and MoKAs: alpha = softmax(g), or 1/r when ungated."""

    def __init__(self, in_features, out_features, r, scale, gated):
        super().__init__()
        self.m, self.n, self.scale, self.gated = out_features, in_features, scale, gated
        self.g = nn.Parameter(torch.zeros(r)) if gated else None
        self.register_buffer("uniform", torch.full((r,), 1.0 / r), persistent=False)

    def alpha(self):
        return torch.softmax(self.g, 0) if self.gated else self.uniform


class TorchMoKA(_GatedMixture):
    """dW = scale * sum_i alpha_i kron(A_i, B_i)[:m, :n], alpha = softmax(g) or 1/r."""

    def __init__(self, in_features, out_features, shapes, scale=1.0, gated=True):
        super().__init__(in_features, out_features, len(shapes), scale, gated)
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for (ma, na), (mb, nb) in shapes:
            bound = 1.0 / math.sqrt(na)
            self.a.append(nn.Parameter(torch.empty(ma, na).uniform_(-bound, bound)))
            self.b.append(nn.Parameter(torch.zeros(mb, nb)))

    def forward(self, x):
        alpha = self.alpha() * self.scale
        return sum(alpha[i] * _factored(x, a, b, self.m, self.n)
                   for i, (a, b) in enumerate(zip(self.a, self.b)))

    def delta_weight(self):
        alpha = self.alpha() * self.scale
        return sum(alpha[i] * torch.kron(a, b)[: self.m, : self.n]
                   for i, (a, b) in enumerate(zip(self.a, self.b)))


class TorchMoKAs(_GatedMixture):
    """dW = scale * sum_i alpha_i kron(I_k, C_i)[:m, :n], C_i: (ceil(m/k), p_i), k = ceil(n/p_i)."""

    def __init__(self, in_features, out_features, primes, scale=1.0, gated=True):
        super().__init__(in_features, out_features, len(primes), scale, gated)
        self.c = nn.ParameterList()
        for p in primes:
            k = -(-in_features // p)
            self.c.append(nn.Parameter(torch.zeros(-(-out_features // k), p)))

    def forward(self, x):
        alpha = self.alpha() * self.scale
        out = 0
        for i, c in enumerate(self.c):
            q, p = c.shape
            k = -(-self.n // p)
            xk = F.pad(x, (0, k * p - self.n)).reshape(*x.shape[:-1], k, p)
            out = out + alpha[i] * (xk @ c.T).reshape(*x.shape[:-1], k * q)[..., : self.m]
        return out

    def delta_weight(self):
        alpha = self.alpha() * self.scale
        out = 0
        for i, c in enumerate(self.c):
            k = -(-self.n // c.shape[1])
            out = out + alpha[i] * torch.kron(torch.eye(k), c)[: self.m, : self.n]
        return out


class TorchLoRA(nn.Module):
    """dW = (alpha / r) B A (PEFT's LoRA without dropout)."""

    def __init__(self, in_features, out_features, r, alpha):
        super().__init__()
        self.scaling = alpha / r
        self.lora_a = nn.Parameter(torch.empty(r, in_features).uniform_(
            -1 / math.sqrt(in_features), 1 / math.sqrt(in_features)))
        self.lora_b = nn.Parameter(torch.zeros(out_features, r))

    def forward(self, x):
        return (x @ self.lora_a.T) @ self.lora_b.T * self.scaling

    def delta_weight(self):
        return self.scaling * self.lora_b @ self.lora_a


class AdaptedLinear(nn.Module):
    """Frozen nn.Linear + adapter delta: the torch twin of moka_jax.nn.Linear."""

    def __init__(self, base: nn.Linear, adapter: nn.Module):
        super().__init__()
        self.base, self.adapter = base, adapter
        for p in self.base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.adapter(x)


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, dtype=np.float32))


def from_jax(adapter) -> nn.Module:
    """A torch reference with the same factor values as a moka_jax adapter module."""
    from moka_jax.adapters import LoRA, MoKA, MoKAs  # local: keep torch_ref importable alone

    if isinstance(adapter, MoKA):
        ref = TorchMoKA(adapter.n, adapter.m, adapter.shapes, adapter.scale, adapter.gated)
        with torch.no_grad():
            for i, (a, b) in enumerate(adapter.components()):
                ref.a[i].copy_(_t(a))
                ref.b[i].copy_(_t(b))
            if adapter.gated:
                ref.g.copy_(_t(adapter.g[...]))
        return ref
    if isinstance(adapter, MoKAs):
        ref = TorchMoKAs(adapter.n, adapter.m, adapter.primes, adapter.scale, adapter.gated)
        with torch.no_grad():
            for i, c in enumerate(adapter.c):
                ref.c[i].copy_(_t(c[...]))
            if adapter.gated:
                ref.g.copy_(_t(adapter.g[...]))
        return ref
    if type(adapter) is LoRA:
        ref = TorchLoRA(adapter.n, adapter.m, adapter.r, adapter.scaling * adapter.r)
        with torch.no_grad():
            ref.lora_a.copy_(_t(adapter.lora_a[...]))
            ref.lora_b.copy_(_t(adapter.lora_b[...]))
        return ref
    raise TypeError(f"no torch reference for {type(adapter).__name__}")
