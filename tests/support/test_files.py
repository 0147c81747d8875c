"""Named file errors: truncated, random-bytes and misplaced files, through every reader.

Each error must name the path, say what is wrong and what to do, and come from a check, not
from whatever the parser tripped on ("cannot reshape array of size 0", "OverflowError").
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from moka_jax.support import files
from moka_jax.data import DataError, load_records, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "data/commonsense_train/openbookqa/train.json"


def truncate(path: Path, frac: float = 0.5) -> Path:
    os.truncate(path, int(path.stat().st_size * frac))
    return path


def randomize(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(max(path.stat().st_size, 64)))
    return path


@pytest.fixture
def tensors_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": np.ones((4, 16), np.float32), "b": np.arange(64, dtype=np.float32)}, str(path),
              metadata={"k": "v"})
    return path


def test_safetensors_header_good(tensors_file):
    header, meta, start = files.safetensors_header(tensors_file)
    assert set(header) == {"a", "b"} and meta == {"k": "v"} and start > 8


@pytest.mark.parametrize("damage, message", [
    (lambda p: truncate(p, 0.9), r"tensor '\w' needs bytes \[\d+, \d+\).*truncated"),
    (lambda p: truncate(p, 0.02), r"too short|header length field says"),
    (randomize, r"header length field says \d+ bytes but the file holds \d+ bytes"),
    (lambda p: p.write_bytes(b""), r"0 bytes, too short"),
    (lambda p: p.write_bytes((20).to_bytes(8, "little") + b"not json at all!!!!!"),
     "header is not JSON"),
])
def test_safetensors_damage_is_named(tensors_file, damage, message):
    damage(tensors_file)
    with pytest.raises(files.FileCheckError, match=message) as e:
        files.safetensors_header(tensors_file, fix="export it again")
    assert str(tensors_file) in str(e.value) and "Export it again" in str(e.value)


def test_json_and_text_checks(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"a": 1, ')
    with pytest.raises(files.FileCheckError, match=r"c.json: config is not valid JSON \(line 1"):
        files.read_json(p, "config")
    randomize(p)
    with pytest.raises(files.FileCheckError, match="not UTF-8 text.*binary or corrupt"):
        files.read_json(p, "config")
    p.write_text("")
    with pytest.raises(files.FileCheckError, match="config is empty"):
        files.read_json(p, "config")
    p.write_text("[1]")
    with pytest.raises(files.FileCheckError, match="holds a JSON list, expected an object"):
        files.read_json_object(p, "config")
    with pytest.raises(files.FileCheckError, match="config not found"):
        files.read_json(tmp_path / "nope.json", "config")
    with pytest.raises(files.FileCheckError, match="is a directory"):
        files.read_json(tmp_path, "config")


def test_tokenizer_dir_and_gguf(tmp_path):
    with pytest.raises(DataError, match=r"no tokenizer files \(none of tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(DataError, match="tokenizer.json: tokenizer file is not valid JSON"):
        load_tokenizer(str(tmp_path))
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(files.FileCheckError, match="m.gguf: not a readable GGUF file"):
        files.check_gguf(g)
    from moka_jax.models.gguf import _check_llama_gguf
    randomize(g)
    with pytest.raises(files.FileCheckError, match="not a readable GGUF file"):
        _check_llama_gguf(g)


@pytest.mark.parametrize("damage, message", [
    (lambda p: randomize(p), r"data file is not UTF-8 text"),
    (lambda p: p.write_text(TRAIN.read_text()[:5000]), r"invalid JSON.*truncated or corrupt"),
    (lambda p: p.write_text(json.dumps([{"instruction": "x", "answer": "y"}])),
     r"record 0: missing field 'output'"),
    (lambda p: p.write_text(json.dumps({"instruction": "x"})), "expected a JSON list"),
])
def test_data_file_damage_is_named(tmp_path, damage, message):
    p = tmp_path / "train.json"
    p.write_text(TRAIN.read_text())
    damage(p)
    with pytest.raises(DataError, match=message) as e:
        load_records(p)
    assert str(p) in str(e.value)


# ---- model and adapter files, through their real readers ------------------------------------



def copy_dir(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    (lambda d: truncate(d / "model.safetensors"), r"model.safetensors: tensor .* truncated"),
    (lambda d: randomize(d / "model.safetensors"), r"model.safetensors: safetensors file header "
                                                   r"length field says"),
    (lambda d: (d / "config.json").write_text('{"architectures": '),
     r"config.json: model config is not valid JSON"),
    (lambda d: (d / "model.safetensors").unlink(), r"no \*.safetensors weights"),
])
def test_model_dir_damage_is_named_before_any_tensor_is_read(hf_dir, tmp_path, damage, message,
                                                             monkeypatch):
    from moka_jax.models import hf
    d = copy_dir(hf_dir, tmp_path / "m")
    damage(d)
    monkeypatch.setattr(hf, "_read_tensor", lambda *a: pytest.fail("a tensor was read"))
    with pytest.raises(hf.CheckpointError, match=message) as e:
        hf.load_hf(d, "none")
    assert str(d) in str(e.value)


def test_converted_dir_given_as_a_hf_dir(hf_dir, tmp_path):
    from moka_jax.models.convert import load_converted, save_converted
    from moka_jax.models.hf import CheckpointError, load_hf
    from moka_jax.models.llama import Llama
    from moka_jax.models.hf import read_config
    cfg = read_config(hf_dir)
    out = save_converted(Llama(cfg, quant="nf4", block_size=16, rngs=nnx.Rngs(0)), cfg,
                         tmp_path / "conv", meta={"source": str(hf_dir)})
    with pytest.raises(CheckpointError, match=r"a `moka-convert` directory.*"
                                              r"moka-generate --model.*" + str(hf_dir)):
        load_hf(out, "none")
    load_converted(out)  # the loader that fits it works
    truncate(out / "quant.json")
    with pytest.raises(files.FileCheckError, match=r"quant.json: quantisation metadata is not "
                                                   r"valid JSON.*moka-convert"):
        load_converted(out)


@pytest.fixture
def adapter_dir(tmp_path):
    from moka_jax.io.adapter_format import write_adapter
    params = {"layers": {"0": {"a": np.ones((2, 3), np.float32)}}}
    return write_adapter(tmp_path / "adapter", params, adapter_config={"kind": "lora", "r": 2},
                        targets="q_proj$", base={})


@pytest.mark.parametrize("damage, message", [
    (lambda d: truncate(d / "adapter.safetensors"), r"adapter.safetensors: .*truncated"),
    (lambda d: randomize(d / "adapter.safetensors"), r"header length field says"),
])
def test_adapter_damage_is_named(adapter_dir, damage, message):
    from moka_jax.io.adapter_format import read_adapter_meta
    from moka_jax.support.trees import CheckpointError
    damage(adapter_dir)
    with pytest.raises(CheckpointError, match=message) as e:
        read_adapter_meta(adapter_dir)
    assert "export the adapter again" in str(e.value).lower()


def test_mmlu_csv_random_bytes(tmp_path):
    from moka_jax.eval.mmlu import read_csv
    p = tmp_path / "x_val.csv"
    p.write_bytes(b"\xff\xfe" + bytes(range(256)))
    with pytest.raises(DataError, match="x_val.csv: MMLU CSV file is not UTF-8"):
        read_csv(p)
