"""models.source: the one resolver of a model name or directory."""

import json

import pytest

from moka_jax.models import source
from moka_jax.support.files import FileCheckError


def test_keywords_and_directories(tmp_path):
    r = source.resolve("random")
    assert (r.kind, r.path, r.has_tokenizer) == ("random", None, False)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    s = source.resolve(str(hf))
    assert (s.kind, s.path, s.has_tokenizer) == ("hf", hf, False)
    (hf / "tokenizer.json").write_text("{}")
    assert source.resolve(hf).has_tokenizer
    conv = tmp_path / "conv"
    conv.mkdir()
    (conv / source.CONVERTED_MARKER).write_text("{}")
    (conv / "config.json").write_text("{}")
    assert source.resolve(conv).kind == "converted" and source.is_converted(conv)
    assert source.resolve_dir("random") is None and source.resolve_dir(hf) == hf


def test_not_a_model_names_the_path(tmp_path):
    with pytest.raises(FileCheckError, match=r"no config.json.*smollm2"):
        source.resolve(tmp_path)
