"""Orbax checkpoints of the training state: save every N steps, verify, restore strictly.

Training checkpoint (every N steps, keep last K, async, atomic: orbax writes a temporary
directory and renames it, so a crash leaves the last complete step):
    state: {"params": adapter tree (pure dict), "opt_state": optax state}
    meta:  {"step", "data": iterator state, "fingerprint": run identity, "tree": {path: shape}}
The adapter a run exports at its end is moka_jax.io.adapter_format's file.
Restores are strict: the saved tree (paths, shapes, dtypes) must equal the live one, checked
from the JSON metadata before any array is read.
Restores verify first: a step whose metadata, manifest or array data is missing, truncated or
unreadable is reported in one line (step, file, cause), moved aside to checkpoints.damaged/
(never deleted), and the newest intact step is restored instead.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from moka_jax.support import files, outputs
from moka_jax.support.diskfull import writing
from moka_jax.support.trees import CheckpointError, compare_signatures, tree_signature


def fingerprint_diff(saved: dict, live: dict) -> list[str]:
    return outputs.dict_diff(saved, live, "checkpoint", "config")


_META_KEYS = ("step", "data", "fingerprint", "tree")
_DAMAGED = "checkpoints.damaged"


def _drop_closed_loop_noise() -> None:
    """When tensorstore reads fail, orbax's restore loop closes while tensorstore's other reads
    still complete; each then reports "Event loop is closed" through sys.unraisablehook (dozens
    of tracebacks around the one real error). Drop exactly those; pass everything else on."""
    previous = sys.unraisablehook
    if getattr(previous, "_moka_jax", False):
        return

    def hook(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        previous(unraisable)

    hook._moka_jax = True
    sys.unraisablehook = hook


def _one_line(e: BaseException, step_dir: Path) -> str:
    """'file: cause' from a tensorstore / orbax error (the file it names, relative to the step)."""
    text = str(e)
    paths = re.findall(r'local file "([^"]+)"', text)
    where = "state"
    if paths:
        where = paths[-1]
        try:
            where = str(Path(where).relative_to(step_dir)).rstrip("/") or "state"
        except ValueError:
            pass
    code = re.match(r"([A-Z_]+):", text)
    detail = re.findall(r"(Error reading [^\[]*\[[^)]*\)|does not exist|Metadata at \S+)", text)
    cause = " ".join(filter(None, [code.group(1) if code else type(e).__name__,
                                   detail[-1] if detail else text.splitlines()[0][:160]]))
    return f"{where}: {cause}"


def list_steps(ckpt_dir) -> list[int]:
    """Finalised steps under a checkpoints/ directory, newest first (orbax's temporary
    directories carry a suffix, so only whole numbers count)."""
    d = Path(ckpt_dir)
    return sorted((int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()),
                  reverse=True) if d.is_dir() else []


def read_step_meta(step_dir) -> dict:
    """The JSON metadata of one step; CheckpointError('meta/metadata: cause') if damaged."""
    path = Path(step_dir) / "meta" / "metadata"
    try:
        meta = files.read_json_object(path, "checkpoint metadata")
    except files.FileCheckError as e:
        raise CheckpointError(f"meta/metadata: {e.problem}") from None
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"meta/metadata: lacks {missing}")
    step = meta["step"]
    name = Path(step_dir).name
    if not isinstance(step, int) or isinstance(step, bool) or (name.isdigit() and
                                                                step != int(name)):
        raise CheckpointError(f"meta/metadata: step {step!r} is not this checkpoint's step "
                              f"({name})")
    for key in ("data", "fingerprint", "tree"):
        if not isinstance(meta[key], dict):
            raise CheckpointError(f"meta/metadata: {key} is {type(meta[key]).__name__}, not a "
                                  "mapping")
    return meta


def verify_step(step_dir) -> str | None:
    """None when the step is intact, else one line 'file: cause'. Reads every stored byte (the
    adapter and optimizer state are small) synchronously with tensorstore, outside orbax."""
    import tensorstore as ts

    step_dir = Path(step_dir)
    try:
        read_step_meta(step_dir)
    except CheckpointError as e:
        return str(e)
    state = step_dir / "state"
    for name in ("manifest.ocdbt", "_METADATA"):
        if not (state / name).is_file():
            return f"state/{name}: missing"
    try:
        kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
        keys = kv.list().result()
        if not keys:
            return "state/manifest.ocdbt: lists no arrays"
        for key in keys:
            kv.read(key).result()
    except Exception as e:  # tensorstore raises ValueError carrying a status code
        return _one_line(e, step_dir)
    return None


def newest_intact(ckpt_dir) -> tuple[int | None, list[tuple[int, str]]]:
    """(newest intact step or None, [(damaged step, cause)] newer than it)."""
    damaged = []
    for step in list_steps(ckpt_dir):
        cause = verify_step(Path(ckpt_dir) / str(step))
        if cause is None:
            return step, damaged
        damaged.append((step, cause))
    return None, damaged


class TrainCheckpointer:
    """CheckpointManager over out_dir/checkpoints with a run fingerprint guard."""

    def __init__(self, out_dir, fingerprint: dict, keep_last: int = 3, async_save: bool = True):
        self.dir = Path(out_dir).absolute() / "checkpoints"
        self.fingerprint = json.loads(json.dumps(fingerprint))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """Every finalised step, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def check_same_run(self) -> None:
        """Refuse a directory written by a run with a different config (before any compile)."""
        for step in self.steps():
            try:
                meta = self._meta(step)
            except CheckpointError:
                continue  # damaged: restore falls back past it; the next step decides
            diff = fingerprint_diff(meta["fingerprint"], self.fingerprint)
            if diff:
                raise CheckpointError(
                    f"{self.dir} holds checkpoints of another run (step {step}); differences:\n  "
                    + "\n  ".join(diff[:10])
                    + "\nUse a new train.out_dir, or set train.overwrite=true to start over.")
            return

    def _meta(self, step: int) -> dict:
        return read_step_meta(self.dir / str(step))

    def verify(self, step: int) -> str | None:
        return verify_step(self.dir / str(step))

    def save(self, step: int, params, opt_state, data_state: dict, extra: dict | None = None):
        meta = {"step": int(step), "data": data_state, "fingerprint": self.fingerprint,
                "tree": tree_signature(params), **(extra or {})}
        # orbax writes a temporary directory and renames it: earlier steps stay whole
        with writing(self.dir / str(step), "the checkpoints before it are intact"):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
                meta=ocp.args.JsonSave(meta)))

    def restore(self, params, opt_state, step: int | None = None, *, log=None):
        """(params, opt_state, meta) of the newest intact step (<= step), restored into the
        structure / shardings of the live ones. Damaged newer steps are reported and set aside."""
        log = log or (lambda line: print(f"[moka_jax] {line}", file=sys.stderr, flush=True))
        _drop_closed_loop_noise()
        damaged = []
        for s in self.steps():
            if step is not None and s > step:
                continue
            cause = self.verify(s)
            if cause is None:
                meta = self._meta(s)
                compare_signatures(meta["tree"], tree_signature(params), f"checkpoint step {s}")
                try:
                    restored = self._restore(s, params, opt_state)
                except Exception as e:  # orbax found what verify could not (e.g. _METADATA)
                    cause = _one_line(e, self.dir / str(s))
                else:
                    for bad, why in damaged:
                        log(f"checkpoint step {bad} is damaged ({why}); restoring step {s}; "
                            f"step {bad} is kept in {self._set_aside(bad)}")
                    return (*restored, meta)
            damaged.append((s, cause))
        lines = "\n  ".join(f"step {s}: {why}" for s, why in damaged) or "(no steps)"
        raise CheckpointError(
            f"{self.dir}: no intact checkpoint to resume from; nothing was deleted:\n  {lines}\n"
            "Set train.overwrite=true to start the run over (that deletes them), or use a new "
            "train.out_dir.")

    def _restore(self, step: int, params, opt_state):
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"params": params, "opt_state": opt_state})
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state = restored["state"]
        return state["params"], state["opt_state"]

    def _set_aside(self, step: int) -> Path:
        """Move a damaged step out of orbax's directory (it would be saved over or counted)."""
        dest = self.dir.parent / _DAMAGED / str(step)
        if jax.process_index() == 0 and (self.dir / str(step)).exists():
            n = 1
            while dest.exists():
                dest, n = self.dir.parent / _DAMAGED / f"{step}.{n}", n + 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            (self.dir / str(step)).rename(dest)
        self.manager.reload()
        return dest

    def wait(self):
        with writing(self.dir, "the checkpoints before the last one are intact"):
            self.manager.wait_until_finished()  # an async save's error surfaces here

    def close(self):
        self.wait()
        self.manager.close()
