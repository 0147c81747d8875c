"""Initialisers shared by the adapters."""

import jax
import jax.numpy as jnp


def kaiming_uniform(key, shape, fan_in: int, dtype=jnp.float32):
    """torch's kaiming_uniform_(a=sqrt(5)), as PEFT uses for LoRA A: U(-1/sqrt(fan_in), ...)."""
    bound = 1.0 / jnp.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
