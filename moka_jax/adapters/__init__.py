"""Adapters under one interface: MoKA, ungated MoKA, MoKAs, LoRA, DoRA."""

from __future__ import annotations

import dataclasses

from moka_jax.adapters.lora import DoRA, DoRAConfig, LoRA, LoRAConfig
from moka_jax.adapters.moka import DEFAULT_SCALE, MoKA, MoKAConfig, MoKAs, MoKAsConfig

ADAPTER_CONFIGS = {c.kind: c for c in (MoKAConfig, MoKAsConfig, LoRAConfig, DoRAConfig)}
AdapterConfig = MoKAConfig | MoKAsConfig | LoRAConfig | DoRAConfig


def adapter_config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def adapter_config_from_dict(d: dict):
    """Inverse of adapter_config_to_dict (lists from JSON / YAML become tuples)."""
    d = dict(d)
    kind = d.pop("kind", "moka")
    if kind not in ADAPTER_CONFIGS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {sorted(ADAPTER_CONFIGS)}")
    cls = ADAPTER_CONFIGS[kind]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown {kind} adapter option(s) {unknown}; valid: {sorted(fields - {'kind'})}")

    def tuplify(v):
        return tuple(tuplify(e) for e in v) if isinstance(v, list | tuple) else v

    return cls(**{k: tuplify(v) for k, v in d.items()})


__all__ = [
    "ADAPTER_CONFIGS", "AdapterConfig", "DEFAULT_SCALE", "DoRA", "DoRAConfig", "LoRA",
    "LoRAConfig", "MoKA", "MoKAConfig", "MoKAs", "MoKAsConfig", "adapter_config_from_dict",
    "adapter_config_to_dict",
]
