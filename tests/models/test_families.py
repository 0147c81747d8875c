"""models.families: which architecture a config.json names, and its own keys both ways (pure;
the checkpoint-level refusals are in test_hf, the parity rows in test_llama / test_hf)."""

import dataclasses

import pytest

from moka_jax.models import families
from moka_jax.models.llama import LlamaConfig

QWEN2 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=64,
             hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2)


def test_architecture_or_model_type_alone_names_the_family():
    assert families.family_of({"model_type": "qwen3"}).architecture == "Qwen3ForCausalLM"
    assert families.family_of({"architectures": ["MistralForCausalLM"]}).model_type == "mistral"


@pytest.mark.parametrize("keys, windows", [
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=2), (None, None, 8, 8)),
    (dict(use_sliding_window=False, sliding_window=8, max_window_layers=0), (None,) * 4),
    (dict(use_sliding_window=True, sliding_window=8, max_window_layers=4), (None,) * 4),
    (dict(use_sliding_window=True, sliding_window=8, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
     (8, None, 8, None)),
], ids=["from-max-window-layers", "window-off", "no-layer-reaches-it", "explicit-types"])
def test_qwen_windows_resolve_as_transformers_does(keys, windows):
    config = LlamaConfig.from_hf_dict({**QWEN2, **keys})
    assert config.layer_windows == windows
    assert config.qkv_bias and config.biased_qkv and not config.attention_bias
    back = LlamaConfig.from_hf_dict(config.to_hf_dict())
    assert back == config and back.layer_windows == windows


def test_mistral_window_covers_every_layer_and_is_written_back():
    d = {**QWEN2, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
         "sliding_window": 16}
    config = LlamaConfig.from_hf_dict(d)
    assert config.layer_windows == (16,) * 4
    hf = config.to_hf_dict()
    assert hf["sliding_window"] == 16 and "layer_types" not in hf and "attention_bias" not in hf


def test_a_mistral_with_mixed_layers_cannot_be_written():
    config = LlamaConfig.from_hf_dict({**QWEN2, "use_sliding_window": True, "sliding_window": 4,
                                       "max_window_layers": 2})
    mixed = dataclasses.replace(config, architecture="MistralForCausalLM", qkv_bias=False)
    with pytest.raises(ValueError, match="one window to every layer"):
        mixed.to_hf_dict()


@pytest.mark.parametrize("window", [0, -3, 2.5, "4096"])
def test_a_window_that_is_not_a_positive_integer_is_refused(window):
    d = {**QWEN2, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
         "sliding_window": window}
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        LlamaConfig.from_hf_dict(d)
