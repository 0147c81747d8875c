"""The configuration tree: one dataclass per section, each field with its domain; the constants
the sections share; the tree back to a plain dict (Config.to_dict)."""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from moka_jax.adapters import MoKAConfig
from moka_jax.models.presets import BYTE_VOCAB_SIZE, TINY
from moka_jax.models.source import KEYWORDS
from moka_jax.support.domains import BETA, COUNT, FRACTION, NON_NEGATIVE, POSITIVE, domain
from moka_jax.nn import DEFAULT_TARGETS

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_KEYWORDS = KEYWORDS                   # model.path values that are not directories
TOKENIZER_KEYWORDS = ("smollm2", "bytes")   # model.tokenizer values that are not directories


def _choices(*values):
    return domain(choices=values)


@dataclass(frozen=True)
class TinyModelConfig:
    """A random LLaMA for tests and debugging (model.path = "random"); models.presets.tiny
    builds it, and its defaults are presets.TINY."""

    vocab: int = field(default=TINY["vocab"], metadata=domain(COUNT))
    hidden: int = field(default=TINY["hidden"], metadata=domain(COUNT))
    layers: int = field(default=TINY["layers"], metadata=domain(COUNT))
    heads: int = field(default=TINY["heads"], metadata=domain(COUNT))
    kv_heads: int = field(default=TINY["kv_heads"], metadata=domain(COUNT))
    intermediate: int = field(default=TINY["intermediate"], metadata=domain(COUNT))
    tie_embeddings: bool = TINY["tie_embeddings"]
    rope_theta: float = field(default=TINY["rope_theta"], metadata=domain(POSITIVE))
    max_position: int = field(default=TINY["max_position"], metadata=domain(COUNT))


@dataclass(frozen=True)
class ModelConfig:
    path: str = "smollm2"          # HF directory | "smollm2" (embedded GGUF) | "random" (tiny)
    tokenizer: str | None = None   # None: from `path`; else HF directory | "smollm2" | "bytes"
    quant: str = field(default="nf4", metadata=_choices("nf4", "int4", "none"))
    block_size: int = field(default=64, metadata=domain(COUNT))  # nf4 block / int4 group size
    double_quant: bool = False     # nf4 only: 8-bit quantised absmax
    int4_symmetric: bool = True    # int4 only
    dtype: str = field(default="bfloat16", metadata=_choices("float32", "bfloat16"))
    remat: bool = False            # rematerialise each decoder layer in the backward pass
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass(frozen=True)
class AdapterSection:
    """`targets` (a regex, or a list of module names as PEFT's target_modules) + one adapter
    config (MoKAConfig | MoKAsConfig | LoRAConfig | DoRAConfig).

    YAML keeps them flat: {kind: moka, targets: ..., r: 10, scale: 1.0}.
    """

    targets: str | list[str] = DEFAULT_TARGETS
    config: typing.Any = field(default_factory=MoKAConfig)

    @property
    def kind(self) -> str:
        return self.config.kind


@dataclass(frozen=True)
class DataFile:
    """One training / validation source; a bare string in YAML is shorthand for {path: ...}.

    path: a .json / .jsonl / .parquet file or a `Dataset.save_to_disk` directory; from Python
    also an in-memory `datasets.Dataset` (a bare Dataset in the list is shorthand too).
    """

    path: str
    # mixing weight; all files weighted or none (= concatenate)
    weight: float | None = field(default=None, metadata=domain(POSITIVE))
    limit: int | None = field(default=None, metadata=domain(COUNT))  # the first `limit` records


@dataclass(frozen=True)
class DataFields:
    """Which column of the data holds each part of a record (default: LLM-Adapters / Alpaca)."""

    instruction: str = "instruction"
    input: str = "input"           # may be absent (= "") unless renamed here
    output: str = "output"
    answer: str = "answer"         # commonsense format only


@dataclass(frozen=True)
class DataConfig:
    train: list[DataFile] = field(default_factory=list)
    val: list[DataFile] = field(default_factory=list)
    # records held out of the training mixture for validation
    val_size: int = field(default=0, metadata=domain(NON_NEGATIVE))
    format: str = field(default="auto", metadata=_choices("auto", "alpaca", "commonsense"))
    fields: DataFields = field(default_factory=DataFields)
    # alpaca: tloen/alpaca-lora's text; llm-adapters: LLM-Adapters' finetune.py string byte for
    # byte (16-space indents, trailing spaces); chat: the tokenizer's chat template; plain:
    # the instruction (and input) as they are, the response straight after (completion data)
    template: str = field(default="alpaca", metadata=_choices("alpaca", "llm-adapters", "chat",
                                                              "plain"))
    train_on_inputs: bool = False
    add_eos: bool = True
    cutoff_len: int = field(default=256, metadata=domain(COUNT))
    buckets: list[int] = field(default_factory=lambda: [64, 128, 256], metadata=domain(COUNT))
    # several examples per row of the largest bucket (segment ids keep them apart); with it
    # train.batch_size counts rows, and the step compiles once
    packing: bool = True
    seed: int = field(default=42, metadata=domain(NON_NEGATIVE))  # shuffling, mixing, val split


@dataclass(frozen=True)
class TrainConfig:
    steps: int = field(default=1000, metadata=domain(COUNT))
    # global rows per optimizer step (one example each unless packing)
    batch_size: int = field(default=32, metadata=domain(COUNT))
    # micro-batches per step (batch_size / grad_accum each)
    grad_accum: int = field(default=1, metadata=domain(COUNT))
    lr: float = field(default=2e-4, metadata=domain(POSITIVE))
    # MoKA gates' lr = lr x this (1.0 until bench/gate_lr_sweep.py is run)
    gate_lr_mult: float = field(default=1.0, metadata=domain(POSITIVE))
    warmup_steps: int = field(default=100, metadata=domain(NON_NEGATIVE))
    schedule: str = field(default="cosine", metadata=_choices("cosine", "linear", "constant"))
    # end of the cosine / linear decay, as a fraction of lr
    min_lr_ratio: float = field(default=0.0, metadata=domain(FRACTION))
    b1: float = field(default=0.9, metadata=domain(BETA))
    b2: float = field(default=0.999, metadata=domain(BETA))
    eps: float = field(default=1e-8, metadata=domain(POSITIVE))
    weight_decay: float = field(default=0.0, metadata=domain(NON_NEGATIVE))
    grad_clip: float | None = field(default=1.0, metadata=domain(POSITIVE))  # null = off
    seed: int = field(default=0, metadata=domain(NON_NEGATIVE))  # adapter init
    log_every: int = field(default=10, metadata=domain(COUNT))
    eval_every: int = field(default=200, metadata=domain(NON_NEGATIVE))  # 0 = never
    # cap on validation batches; null = the whole val set
    eval_batches: int | None = field(default=None, metadata=domain(COUNT))
    save_every: int = field(default=500, metadata=domain(NON_NEGATIVE))  # 0 = only at the end
    keep_last: int = field(default=3, metadata=domain(COUNT))
    out_dir: str = "runs/{name}"
    resume: bool = True            # continue from the latest checkpoint in out_dir
    overwrite: bool = False        # replace a run directory of another config / resume: false
    # resume although a data file or the tokenizer changed since the checkpoint (recorded)
    allow_data_change: bool = False


@dataclass(frozen=True)
class DistributedConfig:
    """Arguments of jax.distributed.initialize; all null = single process."""

    initialize: bool = False       # call it even with all fields null (cluster auto-detection)
    coordinator_address: str | None = None
    num_processes: int | None = field(default=None, metadata=domain(COUNT))
    process_id: int | None = field(default=None, metadata=domain(NON_NEGATIVE))


@dataclass(frozen=True)
class MeshConfig:
    # -1 = all devices not used by the other axis
    data: int = field(default=-1, metadata=domain("-1 or >= 1"))
    fsdp: int = field(default=1, metadata=domain("-1 or >= 1"))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass(frozen=True)
class Config:
    name: str = ""                 # run name; load_config defaults it to the file's stem
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def to_dict(self) -> dict:
        return _to_dict(self)


def _is_dataset(obj) -> bool:
    """An in-memory datasets.Dataset (checked without importing datasets)."""
    ds = sys.modules.get("datasets")
    return ds is not None and isinstance(obj, ds.Dataset)


def _to_dict(obj):
    if _is_dataset(obj):  # stands for its data in run fingerprints; not reloadable from YAML
        return f"<datasets.Dataset {obj._fingerprint}>"
    if isinstance(obj, AdapterSection):
        options = {k: _to_dict(v) for k, v in dataclasses.asdict(obj.config).items() if k != "kind"}
        return {"kind": obj.kind, "targets": obj.targets, **options}
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [_to_dict(v) for v in obj]
    return obj
