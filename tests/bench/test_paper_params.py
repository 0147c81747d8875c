"""bench/paper_params.py: its counts against real adapted models and the published base sizes."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from flax import nnx

from moka_jax import nn
from moka_jax.adapters import DoRAConfig, LoRAConfig, MoKAConfig, MoKAsConfig
from tests.eval import tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("paper_params", REPO / "bench" / "paper_params.py")
pp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pp)


@pytest.mark.parametrize("targets", [r"(q_proj|v_proj)$", r"(k_proj|gate_proj|down_proj)$"])
@pytest.mark.parametrize("adapter", [MoKAConfig(r=3), MoKAConfig(r=2, gated=False),
                                     MoKAsConfig(r=2), LoRAConfig(r=4), DoRAConfig(r=2)])
def test_counts_equal_an_adapted_model(adapter, targets):
    c = tiny_config(hidden=48)
    dims = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size}
    model = tiny_model(hidden=48)
    nn.attach_adapters(model, adapter, targets, rngs=nnx.Rngs(0))
    assert pp.model_params(adapter, dims, targets) == nn.count_params(model)


def test_base_sizes_are_the_published_ones_and_the_table_prints(capsys):
    # Hugging Face's parameter counts of meta-llama/Llama-2-7b-hf, Meta-Llama-3-8B,
    # Qwen/Qwen2.5-0.5B and Qwen/Qwen3-0.6B.
    assert pp.base_params(pp.MODELS["LLaMA-2-7B"]) == 6_738_415_616
    assert pp.base_params(pp.MODELS["LLaMA-3-8B"]) == 8_030_261_248
    assert pp.base_params(pp.MODELS["Qwen2.5-0.5B"]) == 494_032_768
    assert pp.base_params(pp.MODELS["Qwen3-0.6B"]) == 596_049_920
    pp.main()
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    l3 = report["LLaMA-3-8B"]["lora_placements"]
    assert l3["r=32 on q, k, v, up, down (LLM-Adapters / DoRA commonsense)"] == 56_623_104
    assert report["LLaMA-2-7B"]["counts"]["LoRA r=16"] == 32 * 2 * 16 * (4096 + 4096)
    assert "| LLaMA-2-7B | MoKA r=10" in out


@pytest.mark.parametrize("model", sorted(pp.MODELS))
def test_dims_agree_with_the_loader_tensor_list(model):
    """Every table row counts what the checkpoint loader expects of that architecture."""
    from moka_jax.models.hf import hf_tensor_specs
    from moka_jax.models.llama import LlamaConfig

    dims = pp.MODELS[model]
    family = {"qkv_bias": "qwen2", "qk_norm": "qwen3"}
    model_type = next((t for k, t in family.items() if dims.get(k)), "llama")
    specs = hf_tensor_specs(LlamaConfig.from_hf_dict({**dims, "model_type": model_type}))
    assert pp.base_params(dims) == sum(math.prod(s.shape) for s in specs)
    layer0 = {s.path.rsplit("/", 1)[-1]: s.shape for s in specs
              if s.kind == "linear" and s.path.startswith("layers/0/")}
    assert layer0 == pp.linear_shapes(dims)
