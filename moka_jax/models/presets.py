"""Named LLaMA shapes: the random tiny model of tests and debugging, and the published
architectures benches and planners size against (no weights: shapes only).

    presets.tiny()                       # configs/tiny-debug.yaml's model (model.path=random)
    presets.tiny(vocab=512, hidden=128)  # TinyModelConfig's field names
    presets.get("llama2-7b")             # one of PRESETS by name
    presets.smollm2(layers=2)            # SmolLM2-135M's shapes, fewer layers
"""

from __future__ import annotations

import dataclasses

from moka_jax.models.llama import LlamaConfig

BYTE_VOCAB_SIZE = 259  # 256 bytes + <pad>, <s>, </s>: the byte tokenizer of the tiny model

# The tiny model's dimensions, in config.TinyModelConfig's names (its defaults are these).
TINY = dict(vocab=BYTE_VOCAB_SIZE, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
            tie_embeddings=True, rope_theta=10000.0, max_position=2048)


def tiny(**dims) -> LlamaConfig:
    """The random tiny LLaMA: TINY with `dims` (TinyModelConfig's names) changed."""
    unknown = sorted(set(dims) - set(TINY))
    if unknown:
        raise TypeError(f"tiny: unknown dimension(s) {unknown}; choose from {sorted(TINY)}")
    t = {**TINY, **dims}
    return LlamaConfig(vocab_size=t["vocab"], hidden_size=t["hidden"],
                       intermediate_size=t["intermediate"], num_hidden_layers=t["layers"],
                       num_attention_heads=t["heads"], num_key_value_heads=t["kv_heads"],
                       head_dim=t["hidden"] // t["heads"], rope_theta=t["rope_theta"],
                       max_position_embeddings=t["max_position"],
                       tie_word_embeddings=t["tie_embeddings"])


def smollm2(layers: int = 30) -> LlamaConfig:
    """SmolLM2-135M(-Instruct): the embedded model's shapes."""
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                       head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
                       max_position_embeddings=8192, tie_word_embeddings=True)


def llama2_7b(layers: int = 32) -> LlamaConfig:
    """LLaMA-2-7B: MLP 11008 = 2^8 * 43, the awkward dimension of DESIGN.md section 1."""
    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096)


def llama3_8b(layers: int = 32) -> LlamaConfig:
    """LLaMA-3-8B: grouped-query attention (8 KV heads), MLP 14336 = 2^11 * 7."""
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192, bos_token_id=128000,
                       eos_token_ids=(128001,))


PRESETS = {"tiny": tiny, "smollm2": smollm2, "llama2-7b": llama2_7b, "llama3-8b": llama3_8b}


def get(name: str, **changes) -> LlamaConfig:
    """A preset by name, with LlamaConfig fields in `changes` replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name](), **changes)


__all__ = ["BYTE_VOCAB_SIZE", "PRESETS", "TINY", "get", "llama2_7b", "llama3_8b", "smollm2",
           "tiny"]
