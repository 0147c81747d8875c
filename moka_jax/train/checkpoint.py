"""Orbax checkpoints of the training state and the adapter-only export.

Training checkpoint (every N steps, keep last K, async, atomic: orbax writes a temporary
directory and renames it, so a crash leaves the last complete step):
    state: {"params": adapter tree (pure dict), "opt_state": optax state}
    meta:  {"step", "data": iterator state, "fingerprint": run identity, "tree": {path: shape}}
Adapter export (what eval / export load on top of a base model):
    <dir>/adapter.safetensors with {adapter config, targets, base model, tree} as metadata
Restores are strict: the saved tree (paths, shapes, dtypes) must equal the live one, checked
from the JSON metadata before any array is read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from moka_jax import files


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


def fingerprint_diff(saved: dict, live: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(live))
    out = []
    for k in keys:
        a, b = saved.get(k), live.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: checkpoint {a!r} vs config {b!r}")
    return out


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

    def check_same_run(self) -> None:
        """Refuse a directory written by a run with a different config (before any compile)."""
        step = self.latest_step()
        if step is None:
            return
        meta = self._meta(step)
        diff = fingerprint_diff(meta["fingerprint"], self.fingerprint)
        if diff:
            raise CheckpointError(
                f"{self.dir} holds checkpoints of another run (step {step}); differences:\n  "
                + "\n  ".join(diff[:10])
                + "\nUse a new train.out_dir, or delete that directory to start over.")

    def _meta(self, step: int) -> dict:
        path = self.dir / str(step) / "meta" / "metadata"
        if not path.exists():
            raise CheckpointError(f"checkpoint {self.dir / str(step)} has no metadata; "
                                  "it was not written by moka_jax")
        return json.loads(path.read_text())

    def save(self, step: int, params, opt_state, data_state: dict, extra: dict | None = None):
        meta = {"step": int(step), "data": data_state, "fingerprint": self.fingerprint,
                "tree": tree_signature(params), **(extra or {})}
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)))

    def restore(self, params, opt_state, step: int | None = None):
        """(params, opt_state, meta) restored into the structure / shardings of the live ones."""
        step = self.latest_step() if step is None else step
        meta = self._meta(step)
        compare_signatures(meta["tree"], tree_signature(params), f"checkpoint step {step}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"params": params, "opt_state": opt_state})
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state = restored["state"]
        return state["params"], state["opt_state"], meta

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


def save_adapter(out_dir, params, *, adapter_config: dict, targets: str, base: dict,
                 overwrite: bool = False) -> Path:
    """Write the adapter tree as safetensors with its config embedded as metadata.

    <out_dir>/adapter.safetensors (keys = module paths, header metadata = adapter.json) and a
    readable adapter.json. Plain files, no cross-process barrier: call it on one process.
    Atomic: written to a temp dir beside out_dir, then renamed.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    tensors = {k: np.ascontiguousarray(v) for k, v in _flat(local_numpy(pure)).items()}
    meta = {"format": ADAPTER_FORMAT, "adapter": adapter_config, "targets": targets,
            "base": base, "tree": tree_signature(tensors)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(tensors, str(tmp / "adapter.safetensors"),
                  metadata={"moka_jax": json.dumps(meta)})
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
