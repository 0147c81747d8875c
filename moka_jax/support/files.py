"""Checked reads: every file moka_jax reads goes through here, so a bad one is named.

Each error is a FileCheckError (a ValueError) that says which path, what is wrong with it and
what to do, instead of what the parser tripped on ("cannot reshape array of size 0").

    header, meta = safetensors_header(path, fix="re-export the adapter")
    d = read_json(path, fix="...")
    text = read_text(path)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

# dtype name -> bytes per element (safetensors spec; sub-byte and bool types are one byte).
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 2**20   # safetensors' own limit on the JSON header
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class FileCheckError(ValueError):
    """A file or directory that cannot be used; the message names it, the problem and the fix."""

    def __init__(self, path, problem: str | None = None, fix: str = ""):
        if problem is None:  # a finished message (subclasses that predate this module)
            self.path, self.problem, self.fix = None, str(path), ""
            super().__init__(str(path))
            return
        self.path, self.problem, self.fix = Path(path), problem, fix
        super().__init__(f"{path}: {problem}" + (f". {fix[:1].upper()}{fix[1:]}" if fix else ""))


def require_file(path, what: str = "file", fix: str = "") -> Path:
    path = Path(path)
    if path.is_dir():
        raise FileCheckError(path, f"is a directory, expected a {what}", fix)
    if not path.is_file():
        raise FileCheckError(path, f"{what} not found", fix)
    if not os.access(path, os.R_OK):
        raise FileCheckError(path, f"{what} is not readable (permissions)", fix)
    return path


def require_dir(path, what: str = "directory", fix: str = "") -> Path:
    path = Path(path)
    if path.is_file():
        raise FileCheckError(path, f"is a file, expected a {what}", fix)
    if not path.is_dir():
        raise FileCheckError(path, f"{what} not found", fix)
    return path


def read_bytes(path, what: str = "file", fix: str = "") -> bytes:
    require_file(path, what, fix)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise FileCheckError(path, f"cannot read the {what} ({e.strerror})", fix) from None


def read_text(path, what: str = "text file", fix: str = "") -> str:
    """UTF-8 text; binary or corrupt bytes are named as such."""
    raw = read_bytes(path, what, fix)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileCheckError(path, f"{what} is not UTF-8 text (byte {e.start} is 0x"
                             f"{raw[e.start]:02x}): a binary or corrupt file", fix) from None


def read_json(path, what: str = "JSON file", fix: str = ""):
    text = read_text(path, what, fix)
    if not text.strip():
        raise FileCheckError(path, f"{what} is empty", fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FileCheckError(path, f"{what} is not valid JSON (line {e.lineno}, column "
                             f"{e.colno}: {e.msg}); it may be truncated or corrupt", fix) from None


def read_json_object(path, what: str = "JSON file", fix: str = "") -> dict:
    d = read_json(path, what, fix)
    if not isinstance(d, dict):
        raise FileCheckError(path, f"{what} holds a JSON {type(d).__name__}, expected an object",
                             fix)
    return d


def safetensors_header(path, fix: str = "") -> tuple[dict, dict, int]:
    """(tensors {name: {dtype, shape, data_offsets}}, __metadata__, data start) of a
    safetensors file, checked against the file's size before any tensor is read."""
    path = require_file(path, "safetensors file", fix)
    size = path.stat().st_size
    what = "safetensors file"
    if size < 8:
        raise FileCheckError(path, f"{what} is {size} bytes, too short to hold its 8-byte header "
                             "length: truncated or empty", fix)
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > min(size - 8, _MAX_HEADER):
            raise FileCheckError(path, f"{what} header length field says {n} bytes but the "
                                 f"file holds {size} bytes: truncated, or not a safetensors "
                                 "file", fix)
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise FileCheckError(path, f"{what} header is not JSON: corrupt, or not a safetensors "
                             "file", fix) from None
    meta = header.pop("__metadata__", None) or {}
    data = size - 8 - n
    for name, e in header.items():
        try:
            dtype, shape, (a, b) = e["dtype"], e["shape"], e["data_offsets"]
            count = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise FileCheckError(path, f"{what} header entry {name!r} lacks a valid dtype / "
                                 "shape / data_offsets: corrupt file", fix) from None
        if not 0 <= a <= b:
            raise FileCheckError(path, f"tensor {name!r} has data offsets [{a}, {b}): corrupt "
                                 "file", fix)
        if b > data:
            raise FileCheckError(path, f"tensor {name!r} needs bytes [{a}, {b}) of the data "
                                 f"section, which holds only {data} bytes: the file is "
                                 "truncated", fix)
        item = _ST_ITEMSIZE.get(dtype)
        if item is not None and count * item != b - a:
            raise FileCheckError(path, f"tensor {name!r} ({dtype}, shape {list(shape)}) should "
                                 f"take {count * item} bytes, its offsets span {b - a}: corrupt "
                                 "file", fix)
    return header, meta, 8 + n


def check_tokenizer_dir(path, fix: str = "") -> Path:
    """A Hugging Face directory that holds tokenizer files (checked before transformers is)."""
    path = require_dir(path, "tokenizer directory", fix)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileCheckError(path, f"no tokenizer files (none of {', '.join(TOKENIZER_FILES)})",
                             fix or "copy them from the model's original repository, or set "
                             "model.tokenizer (train) to a directory that has them")
    if (path / "tokenizer.json").is_file():
        read_json_object(path / "tokenizer.json", "tokenizer file",
                         fix or "copy a good tokenizer.json from the model's original repository")
    return path


def check_gguf(path, fix: str = "") -> Path:
    """A GGUF file: its magic and a plausible size, before the gguf reader maps it."""
    path = require_file(path, "GGUF file", fix)
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise FileCheckError(path, "not a readable GGUF file (it does not start with the 'GGUF' "
                             "magic): corrupt or truncated", fix)
    return path


__all__ = ["FileCheckError", "TOKENIZER_FILES", "check_gguf", "check_tokenizer_dir",
           "read_bytes", "read_json", "read_json_object", "read_text", "require_dir",
           "require_file", "safetensors_header"]
