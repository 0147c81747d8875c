"""What a run trains on, by content: every data file's sha256 and the tokenizer's fingerprint.

    ident = data_identity(cfg.data, tokenizer)   # {"data.train[0]": {"path", "sha256"}, ...,
                                                  #  "tokenizer": "..."}
    data_changes(saved, ident)                   # ["data.train[0] (x.json) changed: ...", ...]

A run's config fingerprint names its files; this names their contents, so editing a data file
(or swapping the tokenizer's files) between a run and its resumption is seen. The hashes are
the ones the tokenisation cache keys on (one read per file and process: memoised on path,
size and mtime).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

log = logging.getLogger("moka_jax.data")
_DIGESTS: dict[tuple, str] = {}


def file_sha256(path) -> str:
    """sha256 of a file; a directory (a saved Dataset) hashes its files' names and contents."""
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}\0{file_sha256(f)}\0".encode())
        return h.hexdigest()
    st = path.stat()
    key = (str(path.absolute()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """The fast tokenizer's full JSON (vocab, merges, normalizer, truncation / padding state)
    plus its special tokens and chat template; a slow tokenizer through datasets' Hasher.
    None when it cannot be fingerprinted."""
    import datasets

    backend = getattr(tokenizer, "backend_tokenizer", None)
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        try:
            h.update(datasets.fingerprint.Hasher.hash(tokenizer).encode())
        except Exception:  # noqa: BLE001 - an unhashable tokenizer just means no fingerprint
            log.warning("tokenizer %s cannot be fingerprinted", type(tokenizer).__name__)
            return None
    extra = {"eos": tokenizer.eos_token, "eos_id": tokenizer.eos_token_id,
             "bos": getattr(tokenizer, "bos_token", None),
             "chat": getattr(tokenizer, "chat_template", None)}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def data_identity(data_cfg, tokenizer) -> dict:
    """{"data.<split>[i]": {"path", "sha256"}, "tokenizer": fingerprint} of a DataConfig."""
    from moka_jax.config import resolve_path

    out: dict = {}
    for split in ("train", "val"):
        for i, f in enumerate(getattr(data_cfg, split)):
            if isinstance(f.path, str):
                entry = {"path": f.path, "sha256": file_sha256(resolve_path(f.path))}
            else:  # an in-memory Dataset: datasets' own content fingerprint
                entry = {"path": "<Dataset>", "sha256": getattr(f.path, "_fingerprint", None)}
            out[f"data.{split}[{i}]"] = entry
    out["tokenizer"] = tokenizer_fingerprint(tokenizer)
    return out


def data_changes(saved: dict, live: dict) -> list[str]:
    """One line per difference between two data_identity results (saved first)."""
    out = []
    for key in sorted(set(saved) | set(live)):
        a, b = saved.get(key), live.get(key)
        if a == b:
            continue
        if key == "tokenizer":
            out.append("the tokenizer changed (its vocabulary, special tokens or template)")
        elif a is None:
            out.append(f"{key} ({b['path']}) is new")
        elif b is None:
            out.append(f"{key} ({a['path']}) is no longer used")
        else:
            out.append(f"{key} ({b['path']}) changed: sha256 {str(a['sha256'])[:12]} -> "
                       f"{str(b['sha256'])[:12]}")
    return out


__all__ = ["data_changes", "data_identity", "file_sha256", "tokenizer_fingerprint"]
