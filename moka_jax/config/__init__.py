"""One dataclass tree for a training run: YAML in, `--set a.b=v` overrides, validated early.

    cfg = load_config("configs/tiny-debug.yaml", ["train.lr=1e-4", "adapter.r=8"])
    validate(cfg, num_devices=jax.device_count())    # + model path exists, mesh fits

Rules
- A YAML file may `inherit: other.yaml` (relative to itself); mappings merge key by key,
  lists and scalars replace. When a child (or an override) changes `adapter.kind`, the
  parent's kind-specific adapter options are dropped (only `targets` is kept).
- Override values are parsed as YAML scalars / flow collections (`data.buckets=[64,128]`).
  Exponent floats without a dot (`1e-4`) are floats, unlike plain PyYAML.
- Relative data paths resolve against the working directory, then the repository root.
- Every problem raises ConfigError (a ValueError) naming the dotted key and its source.

Modules: `schema` (the dataclass tree and its domains), `sources` (where each key came from;
ConfigError), `build` (dict <-> tree), `checks` (`validate`: across sections and against the
machine), `loading` (YAML, inheritance, overrides, argparse and dump helpers).
"""

from moka_jax.config.build import config_from_dict
from moka_jax.config.checks import resolve_mesh, resolve_path, validate
from moka_jax.config.loading import add_config_args, dump_config, load_config, parse_value
from moka_jax.config.schema import (  # noqa: F401  (BYTE_VOCAB_SIZE, REPO_ROOT re-exported)
    BYTE_VOCAB_SIZE, REPO_ROOT, AdapterSection, Config, DataConfig, DataFields, DataFile,
    DistributedConfig, MeshConfig, ModelConfig, TinyModelConfig, TrainConfig)
from moka_jax.config.sources import ConfigError

__all__ = [
    "AdapterSection", "Config", "ConfigError", "DataConfig", "DataFields", "DataFile",
    "DistributedConfig",
    "MeshConfig", "ModelConfig", "TinyModelConfig", "TrainConfig", "add_config_args",
    "config_from_dict", "dump_config", "load_config", "parse_value", "resolve_mesh",
    "resolve_path", "validate",
]
