"""Held-out records a run never trains on: the tail of a file its config reads the head of.

    held = heldout_records(cfg.data, "data/instruct/gsm8k/train.json", 100)

Training reads the first `limit` records of each data.train file (DataFile.limit); the last n
records of a file are held out only if every training entry of that file stops before them.
That is checked here, so a config edit that starts training on them fails loudly instead of
quietly scoring memorised examples.
"""

from __future__ import annotations

from moka_jax.config import resolve_path
from moka_jax.data.records import DataError
from moka_jax.data.sources import is_dataset, load_records


def heldout_records(data_cfg, path, n: int, *, fields=None) -> list[dict]:
    """The last `n` records of `path`, in file order; DataError unless data_cfg trains on that
    file only through limits that end before them (and trains on something)."""
    if n < 1:
        raise DataError(f"held-out size must be >= 1, got {n}")
    target = resolve_path(str(path)).resolve()
    records, _ = load_records(target, fields=fields or data_cfg.fields)
    start = len(records) - n
    if start < 1:
        raise DataError(f"{path}: {len(records)} records cannot hold out {n} and train on any")
    for f in data_cfg.train:
        if is_dataset(f.path) or resolve_path(f.path).resolve() != target:
            continue
        if f.limit is None or f.limit > start:
            read = "all" if f.limit is None else f"the first {f.limit}"
            raise DataError(f"data.train reads {read} of {path}'s {len(records)} records, so its "
                            f"last {n} are not held out: set its limit <= {start}")
    return records[start:]


__all__ = ["heldout_records"]
