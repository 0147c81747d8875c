"""Helpers shared by the adapters: the initialiser, the f32 residual sum."""

import jax
import jax.numpy as jnp

from moka_jax.core.kron import accumulation_dtype


def kaiming_uniform(key, shape, fan_in: int, dtype=jnp.float32):
    """torch's kaiming_uniform_(a=sqrt(5)), as PEFT uses for LoRA A: U(-1/sqrt(fan_in), ...)."""
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def add_in_f32(y_base, delta_fn):
    """y_base + delta_fn(acc) summed in acc = f32 (or wider), cast once to y_base's dtype."""
    acc = accumulation_dtype(y_base.dtype)
    return (y_base.astype(acc) + delta_fn(acc)).astype(y_base.dtype)
