"""Tiny random transformers LLaMA checkpoints and the (session-cached) real SmolLM2 directory."""

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Tiny configs in the three families the project targets. initializer_range 0.2 (not 0.02)
# keeps attention far from uniform and logits O(1), so parity is a real check.
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
}


def tiny_hf_model(name: str, seed: int = 0, **overrides):
    kw = dict(TINY[name], initializer_range=0.2, rms_norm_eps=1e-5, **overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    with torch.no_grad():  # non-trivial norm scales, so a norm mix-up cannot hide
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


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
    """(family name, HF directory, the transformers model) for each tiny family."""
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
