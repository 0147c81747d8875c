"""Orbax checkpoints of the training state and the adapter-only export.

Training checkpoint (every N steps, keep last K, async, atomic: orbax writes a temporary
directory and renames it, so a crash leaves the last complete step):
    state: {"params": adapter tree (pure dict), "opt_state": optax state}
    meta:  {"step", "data": iterator state, "fingerprint": run identity, "tree": {path: shape}}
Adapter export (what eval / export load on top of a base model):
    <dir>/adapter.safetensors with {adapter config, targets, base model, tree} as metadata
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
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moka_jax import files, outputs


class CheckpointError(ValueError):
    pass


def tree_signature(tree) -> dict[str, list]:
    """{'a/b/c': [shape..., dtype]} for every leaf: the strict-restore contract."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key(k) for k in path): [*map(int, np.shape(v)), str(np.asarray(v).dtype)
                                              if not hasattr(v, "dtype") else str(v.dtype)]
            for path, v in flat}


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def compare_signatures(saved: dict, live: dict, what: str) -> None:
    missing = sorted(set(live) - set(saved))
    extra = sorted(set(saved) - set(live))
    changed = sorted(k for k in set(saved) & set(live) if saved[k] != live[k])
    if missing or extra or changed:
        lines = [f"{what} does not match the model's adapter tree:"]
        if missing:
            lines.append(f"  not in the checkpoint ({len(missing)}): {missing[:5]}")
        if extra:
            lines.append(f"  only in the checkpoint ({len(extra)}): {extra[:5]}")
        for k in changed[:5]:
            lines.append(f"  {k}: checkpoint {saved[k]} vs model {live[k]}")
        lines.append("  The checkpoint was written with another adapter config, targets or model.")
        raise CheckpointError("\n".join(lines))


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
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------- adapter export

ADAPTER_FORMAT = "moka_jax.adapter/1"


def local_numpy(tree):
    """Host copies of (replicated) global arrays; safe on any process of a multi-host run."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def _flat(tree) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key(k) for k in path): v for path, v in flat}


def nest_paths(flat: dict) -> dict:
    """{"a/b/c": v} -> {"a": {"b": {"c": v}}}: the nested dict orbax stores."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def save_adapter(out_dir, params, *, adapter_config: dict, targets: str, base: dict,
                 overwrite: bool = False, owner: dict | None = None,
                 data: dict | None = None) -> Path:
    """Write the adapter tree as safetensors with its config embedded as metadata.

    data: how the training text was rendered ({"template": ...}), so evaluation can prompt
    in the same format.

    <out_dir>/adapter.safetensors (keys = module paths, header metadata = adapter.json) and a
    readable adapter.json. Plain files, no cross-process barrier: call it on one process.
    Atomic (outputs.atomic_output_dir). owner: the run fingerprint; an adapter of the same
    owner is replaced without `overwrite`, one of another owner never silently.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).absolute()
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    tensors = {k: np.ascontiguousarray(v) for k, v in _flat(local_numpy(pure)).items()}
    meta = {"format": ADAPTER_FORMAT, "adapter": adapter_config, "targets": targets,
            "base": base, "tree": tree_signature(tensors)}
    if data is not None:
        meta["data"] = data
    with outputs.atomic_output_dir(out_dir, overwrite, command="save_adapter", owner=owner,
                                   reuse=owner is not None) as tmp:
        save_file(tensors, str(tmp / "adapter.safetensors"),
                  metadata={"moka_jax": json.dumps(meta)})
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=2))
    return out_dir


_ADAPTER_FIX = ("export the adapter again (train.py writes <run>/adapter at the end of a run; "
                "rerunning the finished run rewrites it from its last checkpoint)")


def read_adapter_meta(adapter_dir) -> dict:
    path = Path(adapter_dir) / "adapter.safetensors"
    if not path.exists():
        raise CheckpointError(f"{adapter_dir} is not a moka_jax adapter directory (no "
                              "adapter.safetensors); export one with train.py or save_adapter")
    try:
        _, header_meta, _ = files.safetensors_header(path, fix=_ADAPTER_FIX)
    except files.FileCheckError as e:
        raise CheckpointError(str(e)) from None
    meta = header_meta.get("moka_jax")
    if meta is None:
        raise CheckpointError(f"{path} has no moka_jax metadata; it was not written by moka_jax")
    try:
        meta = json.loads(meta)
        for key in ("adapter", "targets", "tree"):
            meta[key]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path}: its moka_jax metadata is damaged (not JSON with adapter, "
                              f"targets and tree); {_ADAPTER_FIX}") from None
    return meta


def load_adapter_params(adapter_dir, live_params):
    """Values of an exported adapter, in the structure of `live_params` (strict)."""
    from safetensors.numpy import load_file

    meta = read_adapter_meta(adapter_dir)
    pure = nnx.to_pure_dict(live_params) if isinstance(live_params, nnx.State) else live_params
    compare_signatures(meta["tree"], tree_signature(_flat(pure)), f"adapter {adapter_dir}")
    tensors = load_file(str(Path(adapter_dir) / "adapter.safetensors"))
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    leaves = [tensors["/".join(_key(k) for k in path)] for path, _ in flat]
    restored = jax.tree_util.tree_unflatten(treedef, leaves)
    if isinstance(live_params, nnx.State):
        nnx.replace_by_pure_dict(live_params, restored)
        return live_params
    return restored
