"""The run plan: every check a training run needs, before any weight is loaded.

    plan = plan_run(cfg)            # raises a user error naming the problem and the fix
    summary = loop.train(cfg, plan) # the loop reads the plan; it never imports this module

It checks, in this order: the config and the environment (data files, model path, the mesh
against the visible devices, then the batch against the mesh); the run directory (its lock
first: one live owner, see training.lock; then whose run it is, never over an input, see
outputs.check_output) and its newest intact checkpoint; the model directory (config.json,
safetensors headers against it, tokenizer files); data.cutoff_len against the model's
positions; the adapter against the model's layers (targets match, shapes / primes / ranks fit
every targeted layer, planned on an abstract model); the tokenizer against the embedding (both
ways); on a resume, the data and tokenizer by content against the checkpoint's
(check_same_data); the data (fields, tokenisation, what is dropped and why). Only when all of
that holds does it touch the run directory (replace an old run when train.overwrite asks, write
the run's marker); only the lock file is written before.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from moka_jax.config import Config, ConfigError, DataFields, resolve_path, validate
from moka_jax.support import outputs

# What a training run writes into train.out_dir (all of it is replaced by train.overwrite).
RUN_ENTRIES = ("checkpoints", "checkpoints.damaged", "metrics.jsonl", "tb", "adapter",
               "loss.png", "gates.png", "gates.json", outputs.MARKER)
RUN_COMMAND = "train"


@dataclasses.dataclass
class RunPlan:
    """What the plan found and built (nothing heavy): the loop uses it as is."""

    out_dir: Path
    fingerprint: dict              # the run's identity (see fingerprint)
    source: Path | None            # HF directory of the base; None = the random tiny model
    llama: object                  # models.llama.LlamaConfig
    tokenizer: object
    train_data: object
    val_data: object
    targets: list[str]             # adapted layer paths
    mesh: tuple[int, int]          # (data, fsdp)
    resume_step: int | None        # newest intact checkpoint to resume from
    run_state: str                 # "new" | "same" (resume) | "replace"
    data_report: list[dict]
    lock: object = None            # training.lock.RunLock held for the run (process 0)
    inputs: dict | None = None     # data.identity: every data file's sha256, the tokenizer's
    data_changes: list | None = None  # accepted by train.allow_data_change: [{"step", "changes"}]

    def release(self) -> None:
        """Give the run directory back (the run ended, or stopped)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _say(line: str) -> None:
    print(f"[moka_jax] {line}", flush=True)


# Keys that may change between a run and its resumption without changing what is trained.
_VOLATILE = {"train": {"steps", "log_every", "eval_every", "eval_batches", "save_every",
                       "keep_last", "resume", "overwrite", "out_dir",
                       "allow_data_change"}, "mesh": None}
# Keys added after runs were checkpointed, at the value that trains as before: left out of the
# fingerprint there, so those runs still resume.
_ADDED_LATER = {"train": {"gate_lr_mult": 1.0}, "data": {"fields": dataclasses.asdict(DataFields())}}


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.out_dir.format(name=cfg.name or "run")).absolute()


def fingerprint(cfg: Config) -> dict:
    """The config less what may change on resumption: a run's checkpoints belong to it."""
    d = cfg.to_dict()
    for section, keys in _VOLATILE.items():
        if keys is None:
            d.pop(section, None)
        else:
            for k in keys:
                d.get(section, {}).pop(k, None)
    for section, keys in _ADDED_LATER.items():
        for k, old in keys.items():
            if d.get(section, {}).get(k) == old:
                d[section].pop(k)
    return d


def model_source(cfg: Config) -> Path | None:
    """The HF directory of the base model (None for the random tiny model)."""
    from moka_jax.models.source import KEYWORDS, resolve_dir

    path = cfg.model.path  # a directory is found as data paths are (see config.resolve_path)
    return resolve_dir(path if path in KEYWORDS else resolve_path(path))


def tokenizer_spec(cfg: Config, source: Path | None) -> str:
    if cfg.model.tokenizer is not None:
        return cfg.model.tokenizer
    return "bytes" if source is None else str(source)


def tiny_llama_config(cfg: Config):
    from moka_jax.models import presets

    return presets.tiny(**dataclasses.asdict(cfg.model.tiny))


def model_config(cfg: Config, source: Path | None):
    """The base's LlamaConfig from config.json (or the tiny config), with the checkpoint's
    headers and tokenizer checked against it: no tensor is read."""
    if source is None:
        return tiny_llama_config(cfg)
    from moka_jax.models.hf import check_checkpoint, check_tokenizer, checkpoint_index, read_config

    llama = read_config(source)
    check_checkpoint(llama, checkpoint_index(source), source)
    check_tokenizer(source, llama)
    return llama


def check_lengths(cfg: Config, llama) -> None:
    """Every training and validation sequence fits the model's positions. data.cutoff_len is the
    bound: an example is cut to it, padding does not advance positions, and packed examples
    restart theirs, so buckets longer than it (room to pack) are not a position problem."""
    from moka_jax.models.llama import check_positions

    limit = llama.max_position_embeddings
    try:
        check_positions(cfg.data.cutoff_len, llama, "data.cutoff_len",
                        f"lower data.cutoff_len to at most {limit}")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_adapter(cfg: Config, llama) -> list[str]:
    """Attach the adapter to an abstract (weightless) model: targets, shapes, primes and ranks
    meet the real layer dims through the same code a run uses. Returns the adapted paths."""
    from flax import nnx

    from moka_jax import nn
    from moka_jax.models.llama import Llama

    paths: list[str] = []

    def build():
        model = Llama(llama, quant="none", rngs=nnx.Rngs(0))
        paths.extend(nn.attach_adapters(model, cfg.adapter.config, cfg.adapter.targets,
                                        rngs=nnx.Rngs(0)))
        return model

    try:
        nnx.eval_shape(build)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"adapter ({cfg.adapter.kind}, targets {cfg.adapter.targets!r}) does "
                          f"not fit the model: {e}") from None
    return paths


def claim_run_dir(cfg: Config, out_dir: Path, fp: dict, inputs) -> tuple[str, int | None]:
    """(run_state, newest intact step to resume from), with no change to the directory
    except adopting a run from before markers (its checkpoints name its config)."""
    from moka_jax.training.checkpoint import (CheckpointError, list_steps, newest_intact,
                                              read_step_meta)

    ckpt_dir = out_dir / "checkpoints"
    if outputs.read_marker(out_dir) is None:
        for step in list_steps(ckpt_dir):
            try:
                owner = read_step_meta(ckpt_dir / str(step))["fingerprint"]
            except CheckpointError:
                continue
            outputs.write_marker(out_dir, RUN_COMMAND, owner=owner)
            if (out_dir / "adapter").is_dir() and outputs.read_marker(out_dir / "adapter") is None:
                outputs.write_marker(out_dir / "adapter", "save_adapter", owner=owner)
            break
    t = cfg.train
    state = outputs.check_output(
        out_dir, command=RUN_COMMAND, inputs=inputs, overwrite=t.overwrite, owner=fp,
        reuse=t.resume, known=RUN_ENTRIES,
        fix=("Set train.overwrite=true" if t.resume else
             "Set train.resume=true to continue it, or train.overwrite=true")
        + " to replace it (that deletes its checkpoints, metrics and adapter), or use another "
          "train.out_dir")
    if state != "same" or not list_steps(ckpt_dir):
        return state, None
    step, damaged = newest_intact(ckpt_dir)
    if step is None:
        lines = "\n  ".join(f"step {s}: {why}" for s, why in damaged)
        raise CheckpointError(f"{ckpt_dir}: no intact checkpoint to resume from; nothing was "
                              f"deleted:\n  {lines}\nSet train.overwrite=true to start the run "
                              "over (that deletes them), or use a new train.out_dir.")
    return state, step  # damaged newer steps: restore reports them (one line each)


def check_same_data(cfg: Config, step_dir: Path, step: int, live: dict) -> list | None:
    """The run's accepted data changes, [{"step", "changes"}], carried from checkpoint to
    checkpoint: unchanged data and tokenizer (or a checkpoint from before data hashes) keep the
    list; a change is refused with DataError naming each file, or, with
    train.allow_data_change, added to it (metrics.jsonl records it too)."""
    from moka_jax.data.identity import data_changes
    from moka_jax.data.records import DataError
    from moka_jax.training.checkpoint import read_step_meta

    meta = read_step_meta(step_dir)
    changes = data_changes(meta["inputs"], live) if "inputs" in meta else []
    if not changes:
        return meta.get("data_changes")
    if not cfg.train.allow_data_change:
        raise DataError(
            f"{step_dir.parent.parent} was trained to step {step} on other data: "
            f"{'; '.join(changes)}. Resuming would continue on different data"
            + (" (and a different validation split)" if cfg.data.val_size else "")
            + ". Restore the data, use a new train.out_dir, or set "
            "train.allow_data_change=true to resume on it (recorded in the run)")
    _say(f"resuming step {step} on changed data (train.allow_data_change): {'; '.join(changes)}")
    return [*meta.get("data_changes", []), {"step": step, "changes": changes}]


def _apply_run_dir(state: str, out_dir: Path, fp: dict) -> None:
    import jax

    if jax.process_index() == 0:
        if state == "replace":
            for name in RUN_ENTRIES:
                p = out_dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        outputs.write_marker(out_dir, RUN_COMMAND, owner=fp)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("moka_jax run dir claimed")


def data_summary(report: list[dict], n_train: int, n_val: int, val_size: int) -> str:
    records = sum(r["records"] for r in report)
    kept = sum(r["kept"] for r in report)
    why: dict[str, int] = {}
    for r in report:
        for w, n in r["dropped"].items():
            why[w] = why.get(w, 0) + n
    files = ", ".join(f"{Path(r['file']).parent.name}/{Path(r['file']).name} {r['records']}"
                      for r in report)
    line = f"data: {records} examples loaded from {len(report)} file(s) ({files})"
    if why:
        line += f"; dropped {records - kept}: " + ", ".join(f"{n} with {w}" for w, n in why.items())
    else:
        line += "; none dropped"
    held = f", {val_size} of them held out" if val_size else ""
    return line + f"; training on {n_train}, validating on {n_val}{held}"


def plan_run(cfg: Config, num_devices: int | None = None, *, quiet: bool = False) -> RunPlan:
    """Every check a run needs, before any weight is loaded; see the module docstring.

    num_devices: None starts JAX's multi-process runtime when the config asks for it, then
    counts the visible devices; a number plans for that many (tests)."""
    import jax

    from moka_jax.config import resolve_mesh

    if num_devices is None:
        from moka_jax.training import sharding
        sharding.initialize_distributed(cfg.mesh.distributed)
        num_devices = jax.device_count()
    validate(cfg, num_devices=num_devices)
    mesh = resolve_mesh(cfg.mesh, num_devices)
    out_dir = run_dir(cfg)
    fp = fingerprint(cfg)
    source = model_source(cfg)  # smollm2: converted once from its GGUF on first use
    tok = tokenizer_spec(cfg, source)
    inputs = [source, *(resolve_path(f.path) for f in (*cfg.data.train, *cfg.data.val)
                        if isinstance(f.path, str))]  # not in-memory datasets
    if tok not in ("bytes", "smollm2"):
        inputs.append(resolve_path(tok))
    lock = take_run_dir(out_dir, inputs)
    try:
        return _plan_locked(cfg, out_dir, fp, source, tok, inputs, mesh, lock, quiet)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def take_run_dir(out_dir: Path, inputs):
    """The run directory's lock (process 0), before anything there is read: a live run's
    checkpoints, pruning and metrics are its own. Never taken inside an input."""
    import jax

    from moka_jax.training.lock import RunLock

    outputs.check_not_input(out_dir, inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise outputs.OutputError(f"train.out_dir {out_dir} is a file; choose a directory")
    if jax.process_index() != 0:
        return None
    return RunLock.acquire(out_dir, note=_say)


def _plan_locked(cfg, out_dir, fp, source, tok, inputs, mesh, lock, quiet) -> RunPlan:
    import jax

    from moka_jax.data.identity import data_identity
    from moka_jax.data.records import load_tokenizer
    from moka_jax.data.sources import build_datasets
    from moka_jax.models.llama import check_tokenizer_vocab

    state, resume_step = claim_run_dir(cfg, out_dir, fp, inputs)

    llama = model_config(cfg, source)
    check_lengths(cfg, llama)
    targets = check_adapter(cfg, llama)
    tokenizer = load_tokenizer(tok)
    try:
        check_tokenizer_vocab(llama, len(tokenizer), tok)
    except ValueError as e:
        raise ConfigError(f"model.tokenizer: {e}") from None
    inputs_id = data_identity(cfg.data, tokenizer)
    changes = None if resume_step is None else \
        check_same_data(cfg, out_dir / "checkpoints" / str(resume_step), resume_step, inputs_id)
    report: list[dict] = []
    train_data, val_data = build_datasets(cfg.data, tokenizer, report=report)
    n_val = 0 if val_data is None else len(val_data)
    if not quiet and jax.process_index() == 0:
        _say(data_summary(report, len(train_data), n_val, cfg.data.val_size))
    _apply_run_dir(state, out_dir, fp)
    return RunPlan(out_dir=out_dir, fingerprint=fp, source=source, llama=llama, tokenizer=tokenizer,
                   train_data=train_data, val_data=val_data, targets=targets, mesh=mesh,
                   resume_step=resume_step, run_state=state, data_report=report, lock=lock,
                   inputs=inputs_id, data_changes=changes)


__all__ = ["RUN_ENTRIES", "RunPlan", "check_adapter", "check_lengths", "check_same_data",
           "claim_run_dir", "data_summary", "fingerprint", "model_config", "model_source",
           "plan_run", "run_dir", "take_run_dir",
           "tiny_llama_config", "tokenizer_spec"]
