"""Where each dotted key of a configuration came from (a file or `--set`), and the error that
names it: every configuration problem is a ConfigError raised before anything heavy is built."""

from __future__ import annotations

import re


class ConfigError(ValueError):
    """A configuration problem, raised before anything heavy is built."""


class _Sources:
    """Which file (or --set) each dotted key came from, for error messages."""

    def __init__(self, default: str = "<dict>"):
        self.default = default
        self.by_key: dict[str, str] = {}

    def record(self, d, source: str, prefix: str = ""):
        for key in _leaf_keys(d, re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", prefix)):
            self.by_key.pop(key, None)  # keep insertion order = recency
            self.by_key[key] = source

    def of(self, key: str) -> str:
        if key in self.by_key:
            return self.by_key[key]
        hits = [s for k, s in self.by_key.items() if k.startswith((key + ".", key + "["))
                or key.startswith((k + ".", k + "["))]
        return hits[-1] if hits else self.default


def _leaf_keys(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaf_keys(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix


def _error(sources: _Sources, key: str, msg: str):
    raise ConfigError(f"{sources.of(key)}: {msg}")
