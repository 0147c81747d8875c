"""Tiny random transformers checkpoints of every supported family (one table drives the parity,
padding, KV-cache, generation, streaming and export tests) and the real SmolLM2 directory."""

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Tiny configs of every supported architecture (name -> transformers config kwargs; its class in
# ARCH). initializer_range 0.2 (not 0.02) keeps attention far from uniform and logits O(1), so
# parity is a real check. Windows are shorter than the test sequences, so they bite.
TINY = {
    "llama2": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "llama3": dict(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False,
                   max_position_embeddings=256,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 32}),
    "smollm2": dict(vocab_size=192, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    # Mistral-7B v0.1: one sliding window on every layer.
    "mistral": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Qwen2.5-0.5B: q/k/v biases, tied embeddings, theta 1e6, no window.
    "qwen2": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  use_sliding_window=False, sliding_window=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Qwen2 untied, with the window on layers from max_window_layers on (layer 1 of 2 here).
    "qwen2-window": dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Qwen3-0.6B: per-head q/k norms, no biases, head_dim 32 with hidden 64 (4 x 32 != 64).
    "qwen3": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  tie_word_embeddings=True, attention_bias=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
ARCH = {"llama2": "Llama", "llama3": "Llama", "smollm2": "Llama", "mistral": "Mistral",
        "qwen2": "Qwen2", "qwen2-window": "Qwen2", "qwen3": "Qwen3"}
NEW_FAMILIES = ("mistral", "qwen2", "qwen2-window", "qwen3")  # beyond LLaMA


def hf_config(name: str, **overrides):
    """The transformers config of TINY[name] (LlamaConfig, Qwen2Config, ...)."""
    return getattr(transformers, f"{ARCH[name]}Config")(**{**TINY[name], **overrides})


def tiny_hf_model(name: str, seed: int = 0, **overrides):
    config = hf_config(name, initializer_range=0.2, rms_norm_eps=1e-5, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{ARCH[name]}ForCausalLM")(config).eval()
    with torch.no_grad():  # non-trivial norm scales and biases, so a mix-up cannot hide
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return model


def load_transformers(path):
    """A saved directory back in transformers (f32), as the class its config.json names."""
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def save_tiny(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


def hf_logits(model, ids_BT, mask_BT=None, position_ids=None):
    with torch.no_grad():
        kw = {}
        if mask_BT is not None:
            kw["attention_mask"] = torch.as_tensor(np.asarray(mask_BT), dtype=torch.long)
        if position_ids is not None:
            kw["position_ids"] = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
        return model(torch.as_tensor(np.asarray(ids_BT), dtype=torch.long), **kw).logits.float().numpy()


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_dir(request, tmp_path_factory):
    """(family name, HF directory, the transformers model) for each tiny config."""
    model = tiny_hf_model(request.param)
    return request.param, save_tiny(model, tmp_path_factory.mktemp(request.param)), model


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """The real SmolLM2-135M-Instruct as a HF directory, converted once per session.

    Uses $MOKA_CACHE when set (so a developer's cache is reused), else the session temp dir
    that tests/models/test_gguf.py also uses.
    """
    from moka_jax.models.gguf import ensure_smollm2

    cache = os.environ.get("MOKA_CACHE") or tmp_path_factory.getbasetemp() / "moka_cache"
    return ensure_smollm2(cache)
