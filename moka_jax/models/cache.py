"""KV cache for decoding: fixed-size per-layer key / value buffers plus a slot mask.

Slots are written left to right (prefill, then one token per step), so the buffer shape is fixed
and the decode step compiles once. Padding tokens occupy slots but are masked out of attention
and do not advance positions, so left and right padding both work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: tuple  # per layer (B, S, K, H)
    v: tuple  # per layer (B, S, K, H)
    mask_BS: jax.Array  # bool: slot holds a real (non-padding) token
    index: jax.Array  # int32 scalar: next slot to write

    @classmethod
    def init(cls, config, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in zeros),
                   mask_BS=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.mask_BS.shape[1]


def write_slots(buf_BS, new_BT, index):
    """buf[:, index:index+T] = new (a dynamic slice, so one compiled step serves every index)."""
    start = (0, index) + (0,) * (buf_BS.ndim - 2)
    return jax.lax.dynamic_update_slice(buf_BS, new_BT.astype(buf_BS.dtype), start)
