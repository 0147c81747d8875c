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
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from moka_jax import domains
from moka_jax.adapters import ADAPTER_CONFIGS, MoKAConfig, adapter_config_from_dict
from moka_jax.domains import BETA, COUNT, FRACTION, NON_NEGATIVE, POSITIVE, domain

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGETS = r"(q_proj|v_proj)$"
MODEL_KEYWORDS = ("smollm2", "random")      # model.path values that are not directories
TOKENIZER_KEYWORDS = ("smollm2", "bytes")   # model.tokenizer values that are not directories
BYTE_VOCAB_SIZE = 259                       # 256 bytes + <pad>, <s>, </s> (data.byte_tokenizer)


class ConfigError(ValueError):
    """A configuration problem, raised before anything heavy is built."""


def _choices(*values):
    return domain(choices=values)


# ----------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class TinyModelConfig:
    """A random LLaMA for tests and debugging (model.path = "random")."""

    vocab: int = field(default=BYTE_VOCAB_SIZE, metadata=domain(COUNT))
    hidden: int = field(default=64, metadata=domain(COUNT))
    layers: int = field(default=2, metadata=domain(COUNT))
    heads: int = field(default=4, metadata=domain(COUNT))
    kv_heads: int = field(default=2, metadata=domain(COUNT))
    intermediate: int = field(default=128, metadata=domain(COUNT))
    tie_embeddings: bool = True
    rope_theta: float = field(default=10000.0, metadata=domain(POSITIVE))
    max_position: int = field(default=2048, metadata=domain(COUNT))


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
    # byte (16-space indents, trailing spaces); chat: the tokenizer's chat template
    template: str = field(default="alpaca", metadata=_choices("alpaca", "llm-adapters", "chat"))
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


# ----------------------------------------------------------------------------- dict <-> tree


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


def _all_dotted_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        hint = typing.get_type_hints(cls)[f.name]
        if f.name == "adapter" and cls is Config:
            for c in ADAPTER_CONFIGS.values():
                yield from (f"adapter.{n}" for n in _field_names(c))
            yield "adapter.targets"
        elif dataclasses.is_dataclass(hint):
            yield from _all_dotted_keys(hint, key)
        else:
            yield key


def _field_names(cls):
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(sources, prefix, key, valid):
    dotted = f"{prefix}.{key}" if prefix else str(key)
    candidates = [f"{prefix}.{v}" if prefix else v for v in valid]
    # The right name in the wrong section (train.cutoff_len) first, then the nearest name,
    # judged on the last part alone: whole dotted names share their section prefix, which
    # passes for a match (train.cutof_len ~ train.schedule). Ties go to this section.
    leaf = lambda k: k.rsplit(".", 1)[-1]
    close = [k for k in _all_dotted_keys() if leaf(k) == str(key)][:1]
    if not close:
        ratio = lambda k: difflib.SequenceMatcher(None, str(key), leaf(k)).ratio()
        pool = [(ratio(c), 1, c) for c in candidates] + [(ratio(k), 0, k) for k in _all_dotted_keys()]
        best, _, name = max(pool, default=(0.0, 0, None))
        close = [name] if best >= 0.6 else []
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {sorted(candidates)}"
    _error(sources, dotted, f"unknown key '{dotted}'{hint}")


_type_name = domains.type_name


def _convert(hint, value, key, sources):
    """Check `value` against the annotation `hint`; return it in canonical form."""
    def bad():
        _error(sources, key, f"{key} = {value!r} ({type(value).__name__}), expected {_type_name(hint)}")

    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            bad()
        for a in (a for a in args if a is not type(None)):
            try:
                return _convert(a, value, key, sources)
            except ConfigError:
                pass
        bad()
    if dataclasses.is_dataclass(hint):
        if hint is DataFile and (isinstance(value, str) or _is_dataset(value)):
            value = {"path": value}
        return _build(hint, value, key, sources)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list | tuple):
            bad()
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if hint is tuple:
        if not isinstance(value, list | tuple):
            bad()
        return value
    if hint is bool:
        return value if isinstance(value, bool) else bad()
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else bad()
    if hint is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else bad()
    if hint is str:
        return value if isinstance(value, str) else bad()
    return value


def _build(cls, d, prefix, sources):
    if not isinstance(d, dict):
        _error(sources, prefix, f"{prefix or 'config'} must be a mapping, got {d!r}")
    names = _field_names(cls)
    for k in d:
        if k not in names:
            _unknown_key(sources, prefix, k, names)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if cls is Config and f.name == "adapter":
            kwargs[f.name] = _build_adapter(d[f.name], sources)
            continue
        if cls is DataFile and f.name == "path" and _is_dataset(d[f.name]):
            kwargs[f.name] = d[f.name]
            continue
        value = _convert(hints[f.name], d[f.name], key, sources)
        _check_domain(sources, key, value, f)
        kwargs[f.name] = value
    if cls is DataFile and "path" not in kwargs:
        _error(sources, prefix, f"{prefix} needs a 'path'")
    return cls(**kwargs)


def _check_domain(sources, key, value, f: dataclasses.Field):
    try:
        domains.check_domain(key, value, domains.field_domain(f))
    except ValueError as e:
        _error(sources, key, str(e))


def _build_adapter(d, sources):
    if not isinstance(d, dict):
        _error(sources, "adapter", f"adapter must be a mapping, got {d!r}")
    d = dict(d)
    kind = d.pop("kind", "moka")
    if kind not in ADAPTER_CONFIGS:
        close = difflib.get_close_matches(str(kind), list(ADAPTER_CONFIGS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        _error(sources, "adapter.kind",
               f"adapter.kind = {kind!r}, expected one of {sorted(ADAPTER_CONFIGS)}{hint}")
    targets = _convert(str | list[str], d.pop("targets", DEFAULT_TARGETS), "adapter.targets",
                       sources)
    cls = ADAPTER_CONFIGS[kind]
    names = [n for n in _field_names(cls) if n != "kind"]
    for k in d:
        if k not in names:
            owners = sorted(n for n, c in ADAPTER_CONFIGS.items() if k in _field_names(c))
            if owners:
                _error(sources, f"adapter.{k}", f"unknown key 'adapter.{k}' for adapter kind "
                       f"{kind!r}; it is an option of {owners}; {kind} options: {names}")
            _unknown_key(sources, "adapter", k, names + ["kind", "targets"])
    hints = typing.get_type_hints(cls)
    options = {k: _convert(hints[k], v, f"adapter.{k}", sources) for k, v in d.items()}
    for f in dataclasses.fields(cls):
        if f.name in options:
            _check_domain(sources, f"adapter.{f.name}", options[f.name], f)
    try:
        config = adapter_config_from_dict({"kind": kind, **options})
    except (ValueError, TypeError) as e:
        _error(sources, "adapter", f"adapter: {e}")
    return AdapterSection(targets=targets, config=config)


def config_from_dict(d: dict, *, source: str = "<dict>", _sources: _Sources | None = None) -> Config:
    """Build and structurally check a Config (keys, types, choices, regex, buckets, batch)."""
    sources = _sources or _Sources(source)
    if _sources is None:
        sources.record(d, source)
    cfg = _build(Config, d or {}, "", sources)
    if "{name}" in cfg.train.out_dir:
        train = dataclasses.replace(cfg.train, out_dir=cfg.train.out_dir.replace("{name}", cfg.name or "run"))
        cfg = dataclasses.replace(cfg, train=train)
    _check(cfg, sources)
    return cfg


# ----------------------------------------------------------------------------- checks


def _check(cfg: Config, sources: _Sources):
    def fail(key, msg):
        _error(sources, key, msg)

    m = cfg.model
    if not m.path:
        fail("model.path", "model.path is empty")
    if m.path == "random":
        if m.tokenizer is None:
            fail("model.tokenizer", "model.path 'random' needs model.tokenizer "
                 f"(one of {list(TOKENIZER_KEYWORDS)} or a HF tokenizer directory)")
        t = m.tiny
        if t.hidden % t.heads or t.heads % t.kv_heads:
            fail("model.tiny", f"model.tiny: hidden ({t.hidden}) must divide by heads ({t.heads}) "
                 f"and heads by kv_heads ({t.kv_heads})")
        if m.tokenizer == "bytes" and t.vocab < BYTE_VOCAB_SIZE:
            fail("model.tiny.vocab", f"model.tiny.vocab = {t.vocab} is smaller than the byte "
                 f"tokenizer's {BYTE_VOCAB_SIZE} ids")

    if isinstance(cfg.adapter.targets, str):
        try:
            re.compile(cfg.adapter.targets)
        except re.error as e:
            fail("adapter.targets", f"adapter.targets = {cfg.adapter.targets!r} is not a valid "
                 f"regex: {e}")
    else:
        from moka_jax.nn import target_matcher
        try:
            target_matcher(cfg.adapter.targets)
        except ValueError as e:
            fail("adapter.targets", f"adapter.targets: {e}")

    d = cfg.data
    if not d.train:
        fail("data.train", "data.train lists no files")
    for split in ("train", "val"):
        files = getattr(d, split)
        weighted = [f.weight is not None for f in files]
        if any(weighted) and not all(weighted):
            fail(f"data.{split}", f"data.{split}: give every file a weight, or none (concatenate)")
    if not d.buckets or list(d.buckets) != sorted(set(d.buckets)):
        fail("data.buckets", f"data.buckets = {d.buckets}, expected positive, strictly increasing ints")
    if d.cutoff_len > d.buckets[-1]:
        fail("data.cutoff_len", f"data.cutoff_len = {d.cutoff_len} is larger than the largest bucket "
             f"{d.buckets[-1]} (data.buckets = {d.buckets}); add a bucket >= {d.cutoff_len} or lower it")
    columns = {}
    for part in ("instruction", "input", "output", "answer"):
        col = getattr(d.fields, part)
        if not col:
            fail(f"data.fields.{part}", f"data.fields.{part} is empty; name the column that "
                 f"holds the {part}")
        if part != "answer" and col in columns:
            fail(f"data.fields.{part}", f"data.fields.{part} and data.fields.{columns[col]} "
                 f"both read column {col!r}; give each part its own column")
        columns.setdefault(col, part)

    t = cfg.train
    if t.warmup_steps > t.steps:
        fail("train.warmup_steps", f"train.warmup_steps = {t.warmup_steps} exceeds train.steps = {t.steps}; lower it")
    if t.batch_size % t.grad_accum:
        fail("train.batch_size", f"train.batch_size = {t.batch_size} is not divisible by "
             f"train.grad_accum = {t.grad_accum}")

    mesh = cfg.mesh
    if mesh.data == -1 and mesh.fsdp == -1:
        fail("mesh", "mesh.data and mesh.fsdp cannot both be -1")
    # The batch against data x fsdp is checked in validate(), once the device count is known:
    # mesh.data = 3 on one device is a device problem first, not a batch one.
    dist = mesh.distributed
    if dist.process_id is not None and (
            dist.num_processes is not None and dist.process_id >= dist.num_processes):
        fail("mesh.distributed.process_id", f"mesh.distributed.process_id = {dist.process_id} is "
             f"outside [0, num_processes = {dist.num_processes})")


def _check_batch_divides(cfg: Config, batch_devices: int, sources: _Sources):
    """The batch is sharded over both mesh axes (data x fsdp), so each micro-batch must split."""
    t = cfg.train
    micro = t.batch_size // t.grad_accum
    if micro % batch_devices:
        _error(sources, "train.batch_size",
               f"train.batch_size = {t.batch_size} (micro-batch {micro} with grad_accum "
               f"{t.grad_accum}) is not divisible by the mesh's data x fsdp axes "
               f"({batch_devices} devices), over which the batch is sharded")


def resolve_mesh(mesh: MeshConfig, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes for `num_devices`, filling in the -1 axis."""
    data, fsdp = mesh.data, mesh.fsdp
    fix = (f"set mesh.data and mesh.fsdp so that data x fsdp = {num_devices} (the visible "
           f"devices), e.g. mesh.data=-1 (all of them); more devices need more hardware, or "
           f"XLA_FLAGS=--xla_force_host_platform_device_count=N to simulate them on a CPU")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} visible device(s) do not divide by "
                              f"mesh.{'fsdp' if data == -1 else 'data'} = {known}; {fix}")
        data, fsdp = (num_devices // known, fsdp) if data == -1 else (data, num_devices // known)
    if data * fsdp != num_devices:
        raise ConfigError(f"mesh: data ({data}) x fsdp ({fsdp}) = {data * fsdp} devices, "
                          f"but {num_devices} are available; {fix}")
    return data, fsdp


def resolve_path(path: str) -> Path:
    """A data path as written: absolute, else relative to the working dir, else the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


DATA_SUFFIXES = (".json", ".jsonl", ".parquet")  # or a Dataset.save_to_disk directory


def _check_data_files(cfg: Config, sources: _Sources):
    for split in ("train", "val"):
        for i, f in enumerate(getattr(cfg.data, split)):
            if _is_dataset(f.path):
                continue
            p, key = resolve_path(f.path), f"data.{split}[{i}].path"
            if not (p.is_file() or p.is_dir()):
                _error(sources, key, f"{key}: file not found: {f.path!r} "
                       f"(looked in {Path.cwd()} and {REPO_ROOT})")
            if p.is_file() and p.suffix not in DATA_SUFFIXES:
                _error(sources, key, f"{key}: {f.path!r} is not a data file moka-jax reads; "
                       f"use {' / '.join(DATA_SUFFIXES)} or a Dataset.save_to_disk directory")


def validate(cfg: Config, num_devices: int | None = None) -> Config:
    """The checks that need the environment: files exist, the mesh fits `num_devices`."""
    sources = _Sources("config")
    _check(cfg, sources)
    _check_data_files(cfg, sources)
    m = cfg.model
    if m.path not in MODEL_KEYWORDS and not resolve_path(m.path).is_dir():
        raise ConfigError(f"model.path: {m.path!r} is neither a directory nor one of "
                          f"{list(MODEL_KEYWORDS)}")
    if m.tokenizer is not None and m.tokenizer not in TOKENIZER_KEYWORDS \
            and not resolve_path(m.tokenizer).is_dir():
        raise ConfigError(f"model.tokenizer: {m.tokenizer!r} is neither a directory nor one of "
                          f"{list(TOKENIZER_KEYWORDS)}")
    if num_devices is not None:
        data, fsdp = resolve_mesh(cfg.mesh, num_devices)
        _check_batch_divides(cfg, data * fsdp, sources)
    return cfg


# ----------------------------------------------------------------------------- YAML + overrides


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_value(text: str):
    """An override value as YAML: `1e-4` -> float, `[64, 128]` -> list, `null` -> None."""
    return yaml.load(text, Loader=_Loader) if text.strip() else None


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    try:
        d = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(d).__name__}")
    return d


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        if k == "adapter" and isinstance(v, dict) and isinstance(out.get(k), dict):
            old = out[k]
            if "kind" in v and v["kind"] != old.get("kind", "moka"):
                old = {n: old[n] for n in ("targets",) if n in old}
            out[k] = {**old, **v}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_tree(path: Path, sources: _Sources, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"inherit cycle: {chain}")
    d = _read_yaml(path)
    parent = d.pop("inherit", None)
    base = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: inherit = {parent!r}, expected a relative path string")
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ConfigError(f"{path}: inherit: file not found: {parent_path}")
        base = _load_tree(parent_path, sources, (*seen, path))
    sources.record(d, str(path))
    return _merge(base, d)


def _apply_override(d: dict, override: str, sources: _Sources) -> dict:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key=value")
    key, text = override.split("=", 1)
    key = key.strip()
    value = parse_value(text)
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"--set {override!r}: bad key {key!r}")
    if parts == ["adapter", "kind"] and isinstance(d.get("adapter"), dict):
        sources.record(value, f"--set {override}", key)
        return _merge(d, {"adapter": {"kind": value}})
    node = d
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not (p.isdigit() and int(p) < len(node)):
                raise ConfigError(f"--set {override!r}: {'.'.join(parts[:i + 1])!r} is out of range")
            if isinstance(node[int(p)], str):  # DataFile shorthand -> mapping
                node[int(p)] = {"path": node[int(p)]}
            node = node[int(p)]
        elif isinstance(node, dict):
            if not isinstance(node.get(p), dict | list):
                node[p] = {}
            node = node[p]
        else:
            raise ConfigError(f"--set {override!r}: cannot index {'.'.join(parts[:i + 1])!r}")
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"--set {override!r}: index {last!r} out of range")
        node[int(last)] = value
    else:
        node[last] = value
    sources.record(value, f"--set {override}", key)
    return d


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """YAML file (+ inherit chain) -> overrides -> Config, with the structural checks and the
    data files' existence. validate(cfg, num_devices) adds the model path and the mesh."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    sources = _Sources(str(path))
    d = _load_tree(path, sources)
    for o in overrides:
        d = _apply_override(d, o, sources)
    if not d.get("name"):
        d["name"] = path.stem
    cfg = config_from_dict(d, source=str(path), _sources=sources)
    _check_data_files(cfg, sources)
    return cfg


def add_config_args(parser):
    """`config` positional + repeatable `--set key=value` on an argparse parser."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-4")
    return parser


def dump_config(cfg: Config) -> str:
    """YAML text that load_config reads back to an equal Config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


__all__ = [
    "AdapterSection", "Config", "ConfigError", "DataConfig", "DataFields", "DataFile",
    "DistributedConfig",
    "MeshConfig", "ModelConfig", "TinyModelConfig", "TrainConfig", "add_config_args",
    "config_from_dict", "dump_config", "load_config", "parse_value", "resolve_mesh",
    "resolve_path", "validate",
]
