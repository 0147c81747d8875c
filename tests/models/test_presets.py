"""models.presets: the named shapes, and the tiny model the config's TinyModelConfig builds."""

import dataclasses

import pytest

from moka_jax.config import TinyModelConfig
from moka_jax.models import presets


def test_tiny_is_the_configs_tiny_model():
    assert presets.TINY == dataclasses.asdict(TinyModelConfig())  # one set of defaults
    c = presets.tiny()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (presets.BYTE_VOCAB_SIZE, 64, 2)
    assert c.head_dim == 64 // 4 and c.tie_word_embeddings
    assert presets.tiny(layers=3).num_hidden_layers == 3
    with pytest.raises(TypeError, match="unknown dimension"):
        presets.tiny(depth=3)


@pytest.mark.parametrize("name, dims", [
    ("smollm2", (49152, 576, 1536, 30, 9, 3)),
    ("llama2-7b", (32000, 4096, 11008, 32, 32, 32)),
    ("llama3-8b", (128256, 4096, 14336, 32, 32, 8)),
])
def test_published_shapes(name, dims):
    c = presets.get(name)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
            c.num_attention_heads, c.num_key_value_heads) == dims
    assert c.head_dim * c.num_attention_heads == c.hidden_size
    assert presets.get(name, num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="unknown model preset"):
        presets.get("gpt2")
