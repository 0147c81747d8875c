"""MoKA (gated mixture of Kronecker products), its ungated ablation, and MoKAs (block-diagonal).

Adapter interface (shared with lora.py):
    adapter(x, y_base, base) -> y          y_base = base matmul without bias
    adapter.delta(x) -> dW x               (not DoRA); preferred_element_type as kron's
    adapter.delta_weight(base) -> (m, n)   materialised dW (merge, export, tests only)
    adapter.merge(w0) -> (m, n)            merged weight given the (dequantised) base weight
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moka_jax.core import kron, shapes as shapes_lib
from moka_jax.adapters.init import add_in_f32, kaiming_uniform
from moka_jax.support.domains import COUNT, POSITIVE, check_fields, domain
from moka_jax.variables import AdapterParam

# From bench/scale_sweep.py (2026-11-28, CPU): teacher-student fit of one 576x576 layer,
# AdamW lr 2e-4, 300 steps, 3 seeds; final relative error 0.819 / 0.807 / 0.803 / 0.802 /
# 0.802 / 0.804 / 0.813 for scale 0.25 / 0.5 / 1 / 2 / 4 / 8 / 16. The optimum is flat over
# 1..4 and 2 is its middle: weak evidence, to be revisited with a real fine-tuning sweep.
DEFAULT_SCALE = 2.0


def component_groups(shapes) -> dict[Any, list[int]]:
    """{shape: component ids} in first-appearance order: how MoKA stacks equal-shape factors
    (parameter a/g and b/g hold the components group g lists)."""
    order: dict[Any, list[int]] = {}
    for i, s in enumerate(shapes):
        order.setdefault(tuple(map(tuple, s)), []).append(i)
    return order


def _gate_weights(g, r: int, gated: bool):
    if gated:
        return jax.nn.softmax(g[...].astype(jnp.float32))
    return jnp.full((r,), 1.0 / r, jnp.float32)


class MoKA(nnx.Module):
    """dW = scale * sum_i softmax(g)_i * kron(A_i, B_i)[:m, :n], never materialised in apply."""

    def __init__(self, in_features: int, out_features: int, shapes, *, scale: float,
                 gated: bool = True, schedule: str = "auto", rngs: nnx.Rngs,
                 param_dtype=jnp.float32, name: str = ""):
        m, n = out_features, in_features
        shapes = shapes_lib.validate_kron_shapes(shapes, m, n, name)
        shapes_lib.check_adapter_params(
            "MoKA", sum(map(shapes_lib.moka_params, shapes)) + len(shapes) * bool(gated), m, n,
            name, "use fewer or smaller components (adapter.r, adapter.shapes, adapter.budget)")
        self.m, self.n, self.r = m, n, len(shapes)
        self.shapes = tuple(shapes)
        self.scale, self.gated = float(scale), bool(gated)
        self.schedule = kron.check_schedule(schedule)  # resolved when traced (kron.resolve_schedule)
        # Components of equal shape share one stacked parameter per factor, so the apply
        # runs one batched contraction per distinct shape. group_index[g] lists the
        # component ids (positions in `shapes`) stored in group g, in order.
        order = component_groups(shapes)
        self.group_index = tuple(tuple(ids) for ids in order.values())
        a_list, b_list = [], []
        for (ma, na), (mb, nb) in order:
            c = len(order[((ma, na), (mb, nb))])
            a_list.append(AdapterParam(kaiming_uniform(rngs.params(), (c, ma, na), na, param_dtype)))
            b_list.append(AdapterParam(jnp.zeros((c, mb, nb), param_dtype)))
        self.a = nnx.List(a_list)
        self.b = nnx.List(b_list)
        self.g = AdapterParam(jnp.zeros((self.r,), param_dtype)) if gated else None

    def alpha(self):
        """Mixture weights (r,): softmax of the gate, or 1/r when ungated."""
        return _gate_weights(self.g, self.r, self.gated)

    def delta(self, x, preferred_element_type=None):
        # Factors and gate go in unrounded: kron folds them in f32 and casts to x's dtype once.
        alpha = self.alpha() * self.scale
        groups = [(a[...], b[...]) for a, b in zip(self.a, self.b)]
        weights = [alpha[jnp.asarray(ids)] for ids in self.group_index]
        return kron.kron_mixture_apply(x, groups, weights, self.m, self.n, schedule=self.schedule,
                                       preferred_element_type=preferred_element_type)

    def __call__(self, x, y_base, base=None):
        return add_in_f32(y_base, lambda acc: self.delta(x, acc))

    def components(self):
        """[(A_i, B_i)] in component order (f32 arrays)."""
        out = [None] * self.r
        for ids, a, b in zip(self.group_index, self.a, self.b):
            for j, i in enumerate(ids):
                out[i] = (a[...][j], b[...][j])
        return out

    def delta_weight(self, base=None):
        alpha = self.alpha() * self.scale
        dw = jnp.zeros((self.m, self.n), jnp.float32)
        for i, (a, b) in enumerate(self.components()):
            dw = dw + alpha[i] * kron.kron_materialize(a, b, self.m, self.n)
        return dw

    def merge(self, w0):
        return w0 + self.delta_weight().astype(w0.dtype)


class MoKAs(nnx.Module):
    """dW = scale * sum_i alpha_i * kron(I_k_i, C_i)[:m, :n], C_i: (q_i, p_i), p_i distinct primes."""

    def __init__(self, in_features: int, out_features: int, primes, *, scale: float,
                 gated: bool = True, rngs: nnx.Rngs, param_dtype=jnp.float32, name: str = ""):
        m, n = out_features, in_features
        primes = shapes_lib.validate_primes(primes, m, n, name)
        shapes_lib.check_adapter_params(
            "MoKAs", sum(shapes_lib.mokas_params(m, n, p) for p in primes)
            + len(primes) * bool(gated), m, n, name,
            "use fewer or smaller block sizes (adapter.r, adapter.primes, adapter.budget)")
        self.m, self.n, self.r = m, n, len(primes)
        self.primes = tuple(primes)
        self.scale, self.gated = float(scale), bool(gated)
        # C starts at zero so dW = 0 at step 0. Unlike LoRA's B = 0 this needs no random
        # partner factor: dW is linear in C, so dL/dC is non-zero from the first step.
        self.c = nnx.List([
            AdapterParam(jnp.zeros(shapes_lib.mokas_block(m, n, p)[1:], param_dtype))
            for p in primes
        ])
        self.g = AdapterParam(jnp.zeros((self.r,), param_dtype)) if gated else None

    def alpha(self):
        return _gate_weights(self.g, self.r, self.gated)

    def delta(self, x, preferred_element_type=None):
        alpha = self.alpha() * self.scale
        acc = kron.accumulation_dtype(x.dtype)
        # Each component's copy of x comes from one f32 x, so autodiff sums their cotangents
        # in f32 (as core.schedules.batched does); alpha is folded into C in f32.
        x_acc = x.astype(acc)
        y = None
        for i, c in enumerate(self.c):
            c_i = alpha[i] * c[...].astype(acc)
            y_i = kron.blockdiag_apply(x_acc.astype(x.dtype), c_i, self.m, self.n,
                                       preferred_element_type=acc)
            y = y_i if y is None else y + y_i
        return y.astype(preferred_element_type or x.dtype)

    def __call__(self, x, y_base, base=None):
        return add_in_f32(y_base, lambda acc: self.delta(x, acc))

    def delta_weight(self, base=None):
        alpha = self.alpha() * self.scale
        dw = jnp.zeros((self.m, self.n), jnp.float32)
        for i, c in enumerate(self.c):
            dw = dw + alpha[i] * kron.blockdiag_materialize(c[...], self.m, self.n)
        return dw

    def merge(self, w0):
        return w0 + self.delta_weight().astype(w0.dtype)


@dataclasses.dataclass(frozen=True)
class MoKAConfig:
    """MoKA on every target layer. shapes (explicit, win over the planner) or r + budget.

    shapes: one list of ((ma, na), (mb, nb)) for every layer, or {"MxN": list} per weight dims.

    exact: the planner keeps to exact factorisations PEFT LoKr can build, so the adapter
    exports to PEFT (`moka_jax.io.peft_io`); explicit shapes are used as given.
    """

    r: int = dataclasses.field(default=10, metadata=domain(COUNT))
    shapes: tuple | dict | None = None
    budget: int | None = dataclasses.field(default=None, metadata=domain(COUNT))
    scale: float = dataclasses.field(default=DEFAULT_SCALE, metadata=domain(POSITIVE))
    gated: bool = True
    exact: bool = False
    # How the apply runs (kron.resolve_schedule): auto = chunked on CPU, batched on GPU / TPU.
    schedule: str = dataclasses.field(default="auto", metadata=domain(choices=kron.SCHEDULES))
    kind: str = "moka"

    def __post_init__(self):
        check_fields(self)
        kron.check_schedule(self.schedule)
        object.__setattr__(self, "shapes", shapes_lib.shapes_table(self.shapes))  # dict -> pairs

    def layer_shapes(self, m: int, n: int, name: str = ""):
        if self.shapes is not None:
            return shapes_lib.explicit_kron_shapes(self.shapes, m, n, name)
        return shapes_lib.plan_moka_shapes(m, n, self.r, self.budget, name, exact=self.exact)

    def build(self, base, name: str, rngs: nnx.Rngs) -> MoKA:
        m, n = base.out_features, base.in_features
        return MoKA(n, m, self.layer_shapes(m, n, name), scale=self.scale, gated=self.gated,
                    schedule=self.schedule, rngs=rngs, name=name)


@dataclasses.dataclass(frozen=True)
class MoKAsConfig:
    """MoKAs on every target layer. primes (explicit, win over the planner) or r + budget."""

    r: int = dataclasses.field(default=4, metadata=domain(COUNT))
    primes: tuple | None = None
    budget: int | None = dataclasses.field(default=None, metadata=domain(COUNT))
    scale: float = dataclasses.field(default=DEFAULT_SCALE, metadata=domain(POSITIVE))
    gated: bool = True
    kind: str = "mokas"

    def __post_init__(self):
        check_fields(self)

    def layer_primes(self, m: int, n: int, name: str = ""):
        if self.primes is not None:
            return shapes_lib.validate_primes(self.primes, m, n, name)
        return shapes_lib.plan_mokas_primes(m, n, self.r, self.budget, name)

    def build(self, base, name: str, rngs: nnx.Rngs) -> MoKAs:
        m, n = base.out_features, base.in_features
        return MoKAs(n, m, self.layer_primes(m, n, name), scale=self.scale, gated=self.gated,
                     rngs=rngs, name=name)
