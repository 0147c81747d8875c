"""Checks across sections and against the machine (mesh, batch, data files, model path),
run by `validate` before anything heavy is built."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from moka_jax.config.schema import (BYTE_VOCAB_SIZE, MODEL_KEYWORDS, REPO_ROOT, TOKENIZER_KEYWORDS,
                                     Config, MeshConfig, ModelConfig, TinyModelConfig,
                                     _is_dataset)
from moka_jax.config.sources import ConfigError, _error, _Sources


def model_problems(m: ModelConfig):
    """(key, message) for each model key set to a value that would have no effect: every key
    of the section either changes the model or is refused, never ignored."""
    if m.path != "random" and m.tiny != TinyModelConfig():
        changed = sorted(f.name for f in dataclasses.fields(m.tiny)
                         if getattr(m.tiny, f.name) != getattr(TinyModelConfig(), f.name))
        yield "model.tiny", (f"model.tiny ({', '.join(changed)}) shapes the random model only, "
                             f"but model.path is {m.path!r} (its own config.json gives its "
                             "shapes); remove model.tiny or set model.path: random")
    if m.double_quant and m.quant != "nf4":
        yield "model.double_quant", (f"model.double_quant quantises nf4 absmax only, but "
                                     f"model.quant is {m.quant!r}; remove it or use quant nf4")
    if not m.int4_symmetric and m.quant != "int4":
        yield "model.int4_symmetric", (f"model.int4_symmetric applies to quant int4 only, but "
                                       f"model.quant is {m.quant!r}; remove it or use quant int4")
    if m.quant == "none" and m.block_size != ModelConfig.block_size:
        yield "model.block_size", (f"model.block_size = {m.block_size} is the 4-bit block size, "
                                   "but model.quant is 'none'; remove it or use nf4 / int4")


def check_model_section(m: ModelConfig) -> ModelConfig:
    """model_problems as a ConfigError (moka_jax.load of a ModelConfig, outside a run plan)."""
    for _, msg in model_problems(m):
        raise ConfigError(msg)
    return m


def _check(cfg: Config, sources: _Sources):
    def fail(key, msg):
        _error(sources, key, msg)

    m = cfg.model
    for key, msg in model_problems(m):
        fail(key, msg)
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
        if m.tokenizer == "bytes":  # the run plan's tokenizer check, early: no file needed
            from moka_jax.models.llama import check_tokenizer_vocab
            from moka_jax.models.presets import tiny
            try:
                check_tokenizer_vocab(tiny(**dataclasses.asdict(t)), BYTE_VOCAB_SIZE, "bytes")
            except ValueError as e:
                fail("model.tiny.vocab", f"model.tiny.vocab = {t.vocab}: {e}")

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
