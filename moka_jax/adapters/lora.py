"""LoRA and DoRA baselines under the adapter interface of moka.py (QLoRA / QDoRA on a 4-bit base)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moka_jax.adapters.init import add_in_f32, kaiming_uniform
from moka_jax.support.domains import COUNT, POSITIVE, check_fields, domain
from moka_jax.core.kron import accumulation_dtype
from moka_jax.core.shapes import check_adapter_params
from moka_jax.variables import AdapterParam


def _check_rank(r: int, m: int, n: int, name: str, kind: str = "LoRA", extra: int = 0):
    """extra: parameters beside A and B (DoRA's magnitude vector)."""
    if r < 1:
        raise ValueError(f"layer '{name}': LoRA rank must be >= 1, got r={r}")
    if r > min(m, n):
        raise ValueError(f"layer '{name}': LoRA rank r={r} exceeds min(out, in) = {min(m, n)}")
    check_adapter_params(kind, r * (m + n) + extra, m, n, name,
                         f"lower adapter.r to at most {(m * n - extra) // (m + n)}")


class LoRA(nnx.Module):
    """dW = (alpha / r) * B @ A, A: (r, n) Kaiming-uniform, B: (m, r) zero (as PEFT)."""

    has_magnitude = False  # DoRA: one more trainable vector of out_features

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, name: str = ""):
        _check_rank(r, out_features, in_features, name, type(self).__name__,
                    out_features * self.has_magnitude)
        self.m, self.n, self.r = out_features, in_features, r
        self.scaling = float(alpha) / r
        self.lora_a = AdapterParam(kaiming_uniform(rngs.params(), (r, in_features), in_features,
                                                   param_dtype))
        self.lora_b = AdapterParam(jnp.zeros((out_features, r), param_dtype))

    def delta(self, x, preferred_element_type=None):
        """dW x in x's dtype (or preferred_element_type); matmuls accumulate in f32."""
        acc = accumulation_dtype(x.dtype)
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        mid = jnp.matmul(x, a.T, preferred_element_type=acc).astype(x.dtype)  # next matmul's input
        y = jnp.matmul(mid, b.T, preferred_element_type=acc) * self.scaling
        return y.astype(preferred_element_type or x.dtype)

    def __call__(self, x, y_base, base=None):
        return add_in_f32(y_base, lambda acc: self.delta(x, acc))

    def delta_weight(self, base=None):
        return self.scaling * (self.lora_b[...] @ self.lora_a[...])

    def merge(self, w0):
        return w0 + self.delta_weight().astype(w0.dtype)


class DoRA(LoRA):
    """W' = m_j * (W0 + dW)_j / ||(W0 + dW)_j||, row norms over the input axis (PEFT's DoRA).

    As in PEFT, the norm is treated as a constant in the backward pass (stop_gradient), and
    for a 4-bit base W0 is the dequantised weight.
    """

    has_magnitude = True

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, *,
                 w0, rngs: nnx.Rngs, param_dtype=jnp.float32, name: str = ""):
        super().__init__(in_features, out_features, r, alpha, rngs=rngs,
                         param_dtype=param_dtype, name=name)
        self.magnitude = AdapterParam(jnp.linalg.norm(w0.astype(jnp.float32), axis=1)
                                      .astype(param_dtype))

    def _scale(self, w0):
        w = w0.astype(jnp.float32) + self.delta_weight()
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w, axis=1))
        return self.magnitude[...] / norm

    def __call__(self, x, y_base, base=None):
        if base is None:
            raise ValueError("DoRA needs the base layer to compute the weight norm")
        acc = accumulation_dtype(y_base.dtype)
        s = self._scale(base.weight()).astype(acc)  # y = s * (y_base + dW x), in f32
        return (s * (y_base.astype(acc) + self.delta(x, acc))).astype(y_base.dtype)

    def merge(self, w0):
        s = self._scale(w0)
        return (s[:, None] * (w0.astype(jnp.float32) + self.delta_weight())).astype(w0.dtype)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    r: int = dataclasses.field(default=16, metadata=domain(COUNT))
    alpha: float = dataclasses.field(default=32.0, metadata=domain(POSITIVE))
    kind: str = "lora"

    def __post_init__(self):
        check_fields(self)

    def build(self, base, name: str, rngs: nnx.Rngs) -> LoRA:
        return LoRA(base.in_features, base.out_features, self.r, self.alpha, rngs=rngs, name=name)


@dataclasses.dataclass(frozen=True)
class DoRAConfig:
    r: int = dataclasses.field(default=8, metadata=domain(COUNT))
    alpha: float = dataclasses.field(default=16.0, metadata=domain(POSITIVE))
    kind: str = "dora"

    def __post_init__(self):
        check_fields(self)

    def build(self, base, name: str, rngs: nnx.Rngs) -> DoRA:
        return DoRA(base.in_features, base.out_features, self.r, self.alpha,
                    w0=base.weight(), rngs=rngs, name=name)
