"""bench/paper_params.py: its counts against real adapted models and the published base sizes."""

import importlib.util
import json
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
    # Hugging Face's parameter counts of meta-llama/Llama-2-7b-hf and Meta-Llama-3-8B.
    assert pp.base_params(pp.MODELS["LLaMA-2-7B"]) == 6_738_415_616
    assert pp.base_params(pp.MODELS["LLaMA-3-8B"]) == 8_030_261_248
    pp.main()
    out = capsys.readouterr().out
    report = json.loads(out.strip().splitlines()[-1])
    l3 = report["LLaMA-3-8B"]["lora_placements"]
    assert l3["r=32 on q, k, v, up, down (LLM-Adapters / DoRA commonsense)"] == 56_623_104
    assert report["LLaMA-2-7B"]["counts"]["LoRA r=16"] == 32 * 2 * 16 * (4096 + 4096)
    assert "| LLaMA-2-7B | MoKA r=10" in out
