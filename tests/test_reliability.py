"""Reliability: the bad inputs of issue 13, each as the class of inputs it stands for.

Where each class is covered:
- value domains of every option (config, API, CLIs)          tests/support/test_domains.py
- named errors for truncated / random-bytes / misplaced files tests/support/test_files.py
- safe outputs: never over an input / someone's files         tests/support/test_outputs.py
- validation before weights, exit status 2                    tests/training/test_plan.py
- checkpoint damage, fallback, nothing deleted                tests/training/test_checkpoint.py
- metrics never hold a step twice                             tests/training/test_metrics.py
- kill -9 at a random step, then resume                       tests/training/test_train.py
This file holds the public-API cases and the issue's own list, one test per item.
"""

import numpy as np
import pytest
from flax import nnx

import moka_jax as mj
from moka_jax.models.llama import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16)


def model():
    return Llama(TINY, quant="none", rngs=nnx.Rngs(0))


def test_attach_twice_refused_unless_replace():
    m = model()
    mj.attach_adapters(m, mj.LoRAConfig(r=2), r"q_proj$", rngs=nnx.Rngs(1))
    before = np.asarray(m.layers[0].attn.q_proj.adapter.lora_a[...])
    with pytest.raises(ValueError, match=r"1 matched layer\(s\) already have an adapter "
                                         r"\(\['layers/0/attn/q_proj'\]\); pass replace=True"):
        mj.attach_adapters(m, mj.MoKAConfig(r=2), r"q_proj$", rngs=nnx.Rngs(1))
    assert np.array_equal(m.layers[0].attn.q_proj.adapter.lora_a[...], before)  # untouched
    mj.attach_adapters(m, mj.MoKAConfig(r=2), r"q_proj$", rngs=nnx.Rngs(1), replace=True)
    assert type(m.layers[0].attn.q_proj.adapter).__name__ == "MoKA"


@pytest.mark.parametrize("targets", [3, None, {"q_proj"}, b"q_proj"])
def test_targets_of_the_wrong_type(targets):
    with pytest.raises(TypeError, match=r"targets = .*expected a regex string or a list"):
        mj.attach_adapters(model(), mj.LoRAConfig(r=2), targets, rngs=nnx.Rngs(1))


def test_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="expected an adapter config"):
        mj.attach_adapters(model(), {"kind": "lora"}, r"q_proj$", rngs=nnx.Rngs(1))


@pytest.mark.parametrize("make, error, message", [
    (lambda: mj.MoKAConfig(r="4"), TypeError, r"MoKAConfig.r = '4' \(str\), expected int"),
    (lambda: mj.MoKAConfig(scale=-2), ValueError, r"MoKAConfig.scale = -2, expected > 0"),
    (lambda: mj.MoKAsConfig(budget=0), ValueError, r"MoKAsConfig.budget = 0, expected >= 1"),
    (lambda: mj.DoRAConfig(alpha=0), ValueError, r"DoRAConfig.alpha = 0, expected > 0"),
    (lambda: mj.plan_moka_shapes(-4, 64, 2), ValueError, r"m \(out features\) = -4"),
    (lambda: mj.plan_moka_shapes(64, 64, 2.5), TypeError, r"r = 2.5 \(float\), expected int"),
    (lambda: mj.plan_mokas_primes(64, 0, 2), ValueError, r"n \(in features\) = 0"),
])
def test_public_api_values(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_issue_list_each_refused_with_a_named_cause(tmp_path):
    """The issue's own list, one line each (details in the files named above)."""
    from moka_jax import config as C
    cfg = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs/tiny-debug.yaml")
    for override, message in [("train.b2=1.5", "train.b2 = 1.5, expected in [0, 1)"),
                              ("adapter.scale=-2", "adapter.scale = -2.0, expected > 0")]:
        with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
            C.load_config(cfg, [override])
    with pytest.raises(C.ConfigError, match="3 devices, but 1 are available"):
        C.validate(C.load_config(cfg, ["mesh.data=3"]), num_devices=1)
