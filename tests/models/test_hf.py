"""Streaming load (single / sharded / bf16 / nf4), export back to transformers, bad inputs."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from moka_jax.adapters import LoRAConfig, MoKAConfig
from moka_jax.models.convert import convert, load_converted
from moka_jax.models.hf import CheckpointError, checkpoint_index, load_hf, node_at, save_hf
from moka_jax.nn import attach_adapters
from moka_jax.quant import QuantizedWeight

from tests.models.conftest import (NEW_FAMILIES, hf_logits, load_transformers, save_tiny,
                                   tiny_hf_model, torch)

TOL = 1e-4


@nnx.jit
def forward(model, ids_BT):
    return model(ids_BT)


def ids_for(config, shape=(2, 11), seed=0):
    return np.random.RandomState(seed).randint(0, config.vocab_size, shape).astype(np.int32)


def logits(model, ids):
    return np.asarray(forward(model, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    hf = tiny_hf_model("llama3", seed=7)
    return hf, save_tiny(hf, tmp_path_factory.mktemp("llama3"))


def test_sharded_checkpoint_equals_single_file(llama3, tmp_path):
    hf, single = llama3
    sharded = save_tiny(hf, tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a, config = load_hf(single, "none", dtype=jnp.float32)
    b, _ = load_hf(sharded, "none", dtype=jnp.float32)
    ids = ids_for(config)
    np.testing.assert_array_equal(logits(a, ids), logits(b, ids))


def test_bf16_checkpoint_is_read_exactly(llama3, tmp_path):
    hf, _ = llama3
    path = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(path)
    hf.to(torch.float32)
    model, config = load_hf(path, "none", dtype=jnp.float32)
    ref = load_transformers(path)  # bf16 weights widened to f32 by transformers
    ids = ids_for(config)
    assert np.abs(logits(model, ids) - hf_logits(ref, ids)).max() <= TOL
    bf, _ = load_hf(path, "none", dtype=jnp.bfloat16)
    assert bf.embed.embedding.get_value().dtype == jnp.bfloat16
    assert bf.layers[0].attn.q_proj.kernel.get_value().dtype == jnp.bfloat16


@pytest.mark.parametrize("quant", ["nf4", "int4"])
def test_4bit_load_quantises_linears_only(llama3, quant):
    _, path = llama3
    model, config = load_hf(path, quant, dtype=jnp.float32)
    q = model.layers[1].mlp.down_proj.kernel.get_value()
    assert isinstance(q, QuantizedWeight) and q.kind == quant
    assert not isinstance(model.lm_head.kernel.get_value(), QuantizedWeight)
    assert model.embed.embedding.get_value().dtype == jnp.float32
    # The 4-bit model is exactly the dense model on the dequantised weights.
    dense, _ = load_hf(path, "none", dtype=jnp.float32)
    for p, layer in _linears(model):
        if isinstance(layer.kernel.get_value(), QuantizedWeight):
            node_at(dense, p).kernel.set_value(layer.weight(jnp.float32).T)
    ids = ids_for(config)
    assert np.abs(logits(model, ids) - logits(dense, ids)).max() <= 1e-4


def _linears(model):
    from moka_jax.nn import linear_paths

    return linear_paths(model)


def test_sharding_callable_places_every_leaf(llama3):
    _, path = llama3
    seen = []
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def sharding(p):
        seen.append(p)
        return dev

    load_hf(path, "nf4", dtype=jnp.float32, sharding=sharding)
    assert "embed/embedding" in seen and "layers/0/attn_norm/weight" in seen
    assert "layers/2/mlp/up_proj/kernel/packed" in seen
    assert "layers/2/mlp/up_proj/kernel/scales" in seen
    assert "lm_head/kernel" in seen


# The family's own keys, as transformers resolves them (max_window_layers is written too, but
# only layer_types says which layers slide; with no window it is moot and not kept).
FAMILY_KEYS = {"mistral": ("sliding_window",),
               "qwen2": ("use_sliding_window", "sliding_window", "layer_types"),
               "qwen3": ("use_sliding_window", "sliding_window", "layer_types", "attention_bias",
                         "head_dim")}


@pytest.mark.parametrize("family", ["llama2", "smollm2", *NEW_FAMILIES])
def test_export_round_trip_matches_transformers(family, tmp_path):
    """transformers loads the export as the same architecture, with the family's own keys."""
    hf = tiny_hf_model(family, seed=11)
    src = save_tiny(hf, tmp_path / "src")
    model, config = load_hf(src, "none", dtype=jnp.float32)
    out = save_hf(model, config, tmp_path / "out", max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").is_file()  # sharded on purpose
    back = load_transformers(out)
    assert type(back) is type(hf)
    written, source = (json.loads((d / "config.json").read_text()) for d in (out, src))
    for key in ("model_type", "architectures", *FAMILY_KEYS.get(family.split("-")[0], ())):
        assert written[key] == source[key], key
    if family.startswith("qwen"):
        assert back.config.layer_types == hf.config.layer_types and "max_window_layers" in written
    ids = ids_for(config, shape=(2, 12))  # longer than the tiny windows
    assert np.abs(hf_logits(back, ids) - logits(model, ids)).max() <= TOL


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family name -> its tiny HF directory, written once per module."""
    dirs = {}

    def get(family):
        if family not in dirs:
            dirs[family] = save_tiny(tiny_hf_model(family, seed=7),
                                     tmp_path_factory.mktemp(family))
        return dirs[family]
    return get


MOKA_QVD = (MoKAConfig(r=3), r"(q_proj|v_proj|down_proj)$")
LORA_QV = (LoRAConfig(r=4), r"(q_proj|v_proj)$")  # the paper's placement; cheaper to compile


@pytest.mark.parametrize("family, quant, adapter", [
    ("llama3", "none", MOKA_QVD), ("llama3", "nf4", MOKA_QVD),
    *((f, "nf4", LORA_QV) for f in ("qwen2", "qwen3"))],  # Mistral: LLaMA's modules
    ids=lambda x: getattr(x[0], "kind", x))
def test_export_merged_adapter_matches_jax_adapted_model(saved, family, quant, adapter, tmp_path):
    path = saved(family)
    model, config = load_hf(path, quant, dtype=jnp.float32)
    attach_adapters(model, adapter[0], adapter[1], rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    rng = np.random.RandomState(0)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype),
                                   state))  # non-zero B (and gates), so dW != 0
    ids = ids_for(config)
    base, _ = load_hf(path, quant, dtype=jnp.float32)
    adapted = logits(model, ids)
    assert np.abs(adapted - logits(base, ids)).max() > 1e-2  # the adapter does something
    out = save_hf(model, config, tmp_path / "merged", tokenizer_dir=path)
    back = load_transformers(out)
    assert type(back).__name__ == config.architecture
    diff = np.abs(hf_logits(back, ids) - adapted).max()
    assert diff <= TOL, f"merged export vs adapted JAX model: {diff:.2e}"


@pytest.mark.parametrize("family", ["llama3", *NEW_FAMILIES])
def test_nf4_load_streams_one_tensor_at_a_time(saved, family, monkeypatch):
    """The streaming bound of bench/convert_memory.py, per family: at most two checkpoint
    tensors (the one being quantised and the one before it) are alive at once."""
    import weakref

    from moka_jax.models import hf as hf_module

    live, peak, read = {}, [0], hf_module._read_tensor

    def tracked(name, entry):
        arr = read(name, entry)
        live[id(arr)] = arr.nbytes
        peak[0] = max(peak[0], sum(live.values()))
        weakref.finalize(arr, live.pop, id(arr), None)
        return arr

    monkeypatch.setattr(hf_module, "_read_tensor", tracked)
    path = saved(family)
    model, config = load_hf(path, "nf4", dtype=jnp.float32)
    sizes = sorted(e.nbytes for e in checkpoint_index(path).values())
    assert peak[0] <= sum(sizes[-2:]), (peak[0], sizes[-2:])
    assert isinstance(model.layers[0].attn.q_proj.kernel.get_value(), QuantizedWeight)


def test_export_bf16_and_overwrite_rules(llama3, tmp_path):
    _, path = llama3
    model, config = load_hf(path, "none", dtype=jnp.float32)
    out = save_hf(model, config, tmp_path / "bf16", dtype=ml_dtypes.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, config, out)
    save_hf(model, config, out, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    back, _ = load_hf(out, "none", dtype=jnp.float32)
    ids = ids_for(config)
    assert np.abs(logits(back, ids) - logits(model, ids)).max() <= TOL


def test_orbax_convert_round_trip(llama3, tmp_path):
    _, path = llama3
    model, config = load_hf(path, "nf4", dtype=jnp.float32, double_quant=True)
    out = convert(path, tmp_path / "conv", quant="nf4", dtype=jnp.float32, double_quant=True,
                  progress=False)
    back, config2 = load_converted(out)
    assert config2 == config
    q = back.layers[0].attn.q_proj.kernel.get_value()
    assert isinstance(q, QuantizedWeight) and q.double_quant
    ids = ids_for(config)
    np.testing.assert_array_equal(logits(back, ids), logits(model, ids))


# ---- bad input ----------------------------------------------------------------------------

@pytest.fixture
def tiny_copy(llama3, tmp_path):
    import shutil

    return shutil.copytree(llama3[1], tmp_path / "copy")


def edit_config(path, **kw):
    d = json.loads((path / "config.json").read_text())
    d.update(kw)
    (path / "config.json").write_text(json.dumps(d))


def test_missing_config_json(tiny_copy):
    (tiny_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf(tiny_copy, "none")


def test_no_safetensors_and_pickles_are_refused(tiny_copy):
    (tiny_copy / "model.safetensors").rename(tiny_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin.*never"):
        load_hf(tiny_copy, "none")


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"),
     r"'GPT2LMHeadModel' \(model_type 'gpt2'\) is not supported; supported: LlamaForCausalLM "
     r"\(llama\), MistralForCausalLM \(mistral\), Qwen2ForCausalLM \(qwen2\), Qwen3ForCausalLM"),
    (dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2"),
     r"Gemma2ForCausalLM is not supported: it needs GeGLU.*soft-capping.*supported: Llama"),
    (dict(architectures=None, model_type="gemma3_text"), r"Gemma3ForCausalLM is not supported"),
    (dict(architectures=None, model_type=None), r"no architecture .*supported: Llama"),
    (dict(architectures=["Qwen2ForCausalLM"]), r"names Qwen2ForCausalLM but model_type is 'llama'"),
    (dict(attention_bias=True, architectures=["MistralForCausalLM"], model_type="mistral"),
     r"attention_bias=true, but MistralForCausalLM has no attention_bias option"),
    (dict(sliding_window=8), r"LlamaForCausalLM has no sliding-window attention"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral",
          layer_types=["full_attention"] * 3), r"layer_types is not read by MistralForCausalLM"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
          layer_types=["sliding_attention"] * 3), r"sliding_attention layers but no window"),
    (dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_mrope=True),
     r"use_mrope=true .*text-only"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
     r"rope_type 'yarn' is not supported"),
    (dict(attention_dropout=0.1), r"attention_dropout=0.1 is not implemented.*set it to 0.0"),
], ids=["unknown", "gemma2", "gemma3-by-model-type", "none", "mismatch", "bias-key",
        "window-on-llama", "mistral-layer-types", "qwen-types-without-window", "mrope", "yarn",
        "dropout"])
def test_config_refusals_name_the_key_before_any_weight_is_read(tiny_copy, change, message):
    (tiny_copy / "model.safetensors").unlink()  # a refusal after this point would name it
    edit_config(tiny_copy, **change)
    with pytest.raises(CheckpointError, match=r"config\.json: .*" + message):
        load_hf(tiny_copy, "none")


def test_shape_disagreement_names_file_and_tensor(tiny_copy):
    edit_config(tiny_copy, intermediate_size=256)
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight "
                             r"has shape \(192, 128\).*\(256, 128\)"):
        load_hf(tiny_copy, "none")


def test_missing_tensor_is_named(tiny_copy):
    from safetensors.numpy import load_file

    tensors = load_file(tiny_copy / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, tiny_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight is missing"):
        load_hf(tiny_copy, "none")


def test_unexpected_tensor_is_named(tiny_copy):
    from safetensors.numpy import load_file

    tensors = load_file(tiny_copy / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(128, np.float32)
    save_file(tensors, tiny_copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj\.bias"):
        load_hf(tiny_copy, "none")


def test_tokenizer_larger_than_embedding(tiny_copy):
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(300)}  # the embedding has 256 rows
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(tiny_copy / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: the tokenizer \(tokenizer\.json\) "
                                                 r"has 300 tokens.*256 rows"):
        load_hf(tiny_copy, "none")
