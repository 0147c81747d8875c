"""Merge parity (every adapter kind, dense and nf4 base), HF export in transformers, the export
CLI (hf, peft, orbax), overwrite rules, on tiny random f32 models (PEFT itself: test_peft_io)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moka_jax.cli import export as export_cli
from moka_jax.io import export
from moka_jax.adapters import (DoRAConfig, LoRAConfig, MoKAConfig, MoKAsConfig,
                               adapter_config_to_dict)
from moka_jax.models.llama import Llama, LlamaConfig
from moka_jax.nn import adapter_state, attach_adapters, linear_paths
from moka_jax.io.peft_io import export_peft
from moka_jax.quant import QuantizedWeight, dequantize, quantize

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
# heads == kv_heads: q_proj and v_proj are both 64 x 64, so one LoKr factorisation fits both.
TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=16)
TARGETS = r"(q_proj|v_proj|down_proj)$"
ADAPTERS = {"moka": MoKAConfig(r=3), "mokas": MoKAsConfig(r=2), "lora": LoRAConfig(r=4),
            "dora": DoRAConfig(r=4)}
IDS = np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 9)).astype(np.int32)


def adapted_model(adapter, quant="none", targets=TARGETS, seed=0, config=TINY):
    """A tiny model with `adapter` whose factors (and gates) are random, so dW != 0."""
    model = Llama(config, quant=quant, rngs=nnx.Rngs(1))
    attach_adapters(model, adapter, targets, rngs=nnx.Rngs(2))
    rng = np.random.RandomState(seed)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                                   adapter_state(model)))
    return model


@nnx.jit
def _forward(model, ids_BT):
    return model(ids_BT)


def logits(model, ids=IDS):
    return np.asarray(_forward(model, jnp.asarray(ids)))


def hf_logits(path, ids=IDS, lokr=None):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if lokr is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, lokr).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("quant", ["none", "nf4"])
@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_merged_equals_adapted(kind, quant):
    model = adapted_model(ADAPTERS[kind], quant)
    merged = export.merge_model(model)
    assert all(layer.adapter is None for _, layer in linear_paths(merged))
    layers = dict(linear_paths(merged))
    assert not isinstance(layers["layers/0/attn/q_proj"].kernel.get_value(), QuantizedWeight)
    assert isinstance(layers["layers/0/attn/k_proj"].kernel.get_value(),
                      QuantizedWeight) == (quant == "nf4")  # unadapted layers are kept as-is
    adapted = logits(model)
    base = Llama(TINY, quant=quant, rngs=nnx.Rngs(1))
    assert np.abs(adapted - logits(base)).max() > 1e-2  # the adapter does something
    diff = np.abs(logits(merged) - adapted).max()
    assert diff <= TOL, f"{kind} on {quant}: merged vs adapted {diff:.2e}"
    assert dict(linear_paths(model))["layers/0/attn/q_proj"].adapter is not None  # input untouched


def test_requantized_merge_is_4bit_and_close():
    model = adapted_model(ADAPTERS["moka"], "nf4")
    merged = export.merge_model(model, requantize="nf4")
    q = dict(linear_paths(merged))["layers/0/attn/q_proj"]
    assert q.adapter is None and isinstance(q.kernel.get_value(), QuantizedWeight)
    # Exactly the nf4 rounding of W0 (dequantised) + dW.
    expected = dequantize(quantize(dict(linear_paths(model))["layers/0/attn/q_proj"]
                                   .merged_weight(), "nf4"))
    np.testing.assert_array_equal(np.asarray(q.weight()), np.asarray(expected))


def test_hf_export_matches_jax_merged(tmp_path):
    model = adapted_model(ADAPTERS["moka"], "nf4")
    out = export.export_hf(model, TINY, tmp_path / "hf")
    jax_merged = logits(export.merge_model(model))
    diff = np.abs(hf_logits(out) - jax_merged).max()
    assert diff <= TOL, f"transformers vs JAX merged: {diff:.2e}"
    assert np.abs(jax_merged - logits(model)).max() <= TOL


def test_existing_target_refused_and_overwrite(tmp_path):
    model = adapted_model(MoKAConfig(shapes=(((8, 8), (8, 8)),), gated=False),
                          targets=r"q_proj$")
    (tmp_path / "taken").mkdir()  # an empty directory is free to use
    export.export_hf(model, TINY, tmp_path / "taken")
    with pytest.raises(FileExistsError, match="overwrite"):
        export.export_hf(model, TINY, tmp_path / "taken")
    export.export_hf(model, TINY, tmp_path / "taken", overwrite=True)
    # Overwrite replaces only its own kind: a PEFT export never replaces a merged model.
    with pytest.raises(FileExistsError, match="output of `export-hf`.*not even with"):
        export_peft(model, tmp_path / "taken", None, overwrite=True)
    export_peft(model, tmp_path / "peft", None)
    export_peft(model, tmp_path / "peft", None, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft", "taken"]  # no temp dirs left
    # Files moka_jax did not write are never replaced, not even with overwrite.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\).*not even with"):
        export.export_hf(model, TINY, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_exports_a_trained_adapter_dir(tmp_path):
    from moka_jax.config import Config, ModelConfig, TinyModelConfig
    from moka_jax.io.adapter_format import write_adapter
    from moka_jax.support.trees import local_numpy
    from moka_jax.api import load

    tiny = TinyModelConfig(vocab=259, hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128)
    cfg = Config(model=ModelConfig(path="random", tokenizer="bytes", quant="nf4",
                                   dtype="float32", tiny=tiny))
    model, _ = load(cfg.model)
    lconfig = model.config
    adapter = MoKAConfig(r=2)
    attach_adapters(model, adapter, r"(q_proj|v_proj)$", rngs=nnx.Rngs(0))
    rng = np.random.RandomState(3)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                                   adapter_state(model)))
    write_adapter(tmp_path / "adapter", local_numpy(adapter_state(model)),
                  adapter_config=adapter_config_to_dict(adapter), targets=r"(q_proj|v_proj)$",
                  base={"path": "random", "quant": "nf4", "tiny": dataclasses.asdict(tiny)})
    argv = ["--model", "random", "--adapter", str(tmp_path / "adapter"), "--out",
            str(tmp_path / "hf")]
    assert export_cli.main(argv) == 0
    ids = IDS % lconfig.vocab_size
    assert np.abs(hf_logits(tmp_path / "hf", ids) - logits(model, ids)).max() <= TOL
    assert export_cli.main(argv) == 2  # exists, no --overwrite

    # --format orbax needs no base; the tree loads back bit for bit.
    orbax_argv = ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "orbax"),
                  "--format", "orbax"]
    assert export_cli.main(orbax_argv) == 0
    import moka_jax as mj
    back, _ = mj.load("random", adapter=tmp_path / "orbax", quant="nf4", dtype=jnp.float32)
    np.testing.assert_array_equal(logits(back, ids), logits(model, ids))
    # --format peft: the default planner's q_proj shapes are not PEFT's; refused, nothing written.
    assert export_cli.main(argv[:-1] + [str(tmp_path / "peft"), "--format", "peft"]) == 2
    assert not (tmp_path / "peft").exists()
