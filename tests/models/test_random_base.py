"""models.random_base: a random nf4 LLaMA made on the device, laid out as load_hf's."""

import jax
import jax.numpy as jnp
from flax import nnx

from moka_jax import quant
from moka_jax.models import presets
from moka_jax.models.random_base import random_nf4, random_nf4_base


def test_random_base_is_laid_out_as_load_hf():
    c = presets.tiny(vocab=512, hidden=128, intermediate=256, heads=4, kv_heads=4,
                     tie_embeddings=False)
    model = random_nf4_base(c, jnp.bfloat16)
    q = model.layers[0].attn.q_proj.kernel.get_value()
    assert isinstance(q, quant.QuantizedWeight) and q.kind == "nf4" and q.shape == (128, 128)
    assert model.lm_head.kernel.get_value().dtype == jnp.bfloat16  # dense, as load_hf keeps it
    assert not any(isinstance(v.get_value(), jax.ShapeDtypeStruct)
                   for _, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable))
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.shape == (1, 8, c.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


def test_random_nf4_is_seeded():
    a = random_nf4(jax.random.key(0), 16, 64, 64)
    b = random_nf4(jax.random.key(0), 16, 64, 64)
    c = random_nf4(jax.random.key(1), 16, 64, 64)
    assert (a.packed == b.packed).all() and not (a.packed == c.packed).all()
    assert a.shape == (16, 64) and a.block_size == 64
