"""Adapter directories in three formats behind one reader and one writer.

    safetensors  <dir>/adapter.safetensors (+ adapter.json): moka-jax's own, what training writes
    orbax        an orbax checkpoint of the functional adapter tree (a nested dict of arrays
                 keyed by layer path, e.g. tree["layers"]["0"]["attn"]["q_proj"]["adapter"]),
                 the adapter config, targets and base in its custom metadata; plain orbax
                 restores it: ocp.StandardCheckpointer().restore(dir)
    peft         a PEFT directory (adapter_config.json + adapter_model.safetensors), see peft_io
The safetensors file itself is moka_jax.io.adapter_format.

Every reader gives the same pair: meta {"adapter", "targets", "base", "tree"} and the values
{"layers/0/attn/q_proj/adapter/lora_a": array, ...}, so attaching and loading do not care
where an adapter came from. Loads are strict: paths, shapes and dtypes must match.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from moka_jax.io.adapter_format import (ADAPTER_FORMAT, is_adapter_dir, read_adapter_meta,
                                        read_adapter_values, write_adapter)
from moka_jax.support.diskfull import writing
from moka_jax.support.finite import check_finite
from moka_jax.support.outputs import check_output, write_marker
from moka_jax.support.trees import (CheckpointError, compare_signatures, flat_paths, local_numpy,
                                    nest_paths, path_key, tree_signature)

FORMATS = ("safetensors", "orbax", "peft")
_ORBAX_MARKER = "_CHECKPOINT_METADATA"


def detect_format(path) -> str:
    path = Path(path)
    if is_adapter_dir(path):
        return "safetensors"
    if (path / _ORBAX_MARKER).is_file():
        return "orbax"
    if (path / "adapter_config.json").is_file():
        return "peft"
    what = "does not exist" if not path.exists() else "holds none of adapter.safetensors " \
        "(moka-jax), an orbax checkpoint or adapter_config.json (PEFT)"
    raise CheckpointError(f"adapter {path} {what}; give a directory written by training, "
                          "moka_jax.save_adapter or PeftModel.save_pretrained")


def _string_keys(tree):
    """Nested dict with str keys (orbax stores keys as strings; ints come back as '0')."""
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _pure(params):
    return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params


# ---- orbax -------------------------------------------------------------------------------

def save_orbax(out_dir, params, meta: dict, overwrite: bool = False, *,
               command: str = "save_orbax") -> Path:
    """The adapter tree as an orbax checkpoint; call it on EVERY process of a multi-host run
    (orbax's save is collective). The adapter is replicated, so host copies are written: the
    checkpoint then records no device topology and restores anywhere without a target. An
    existing out_dir is kept aside until the new checkpoint is complete."""
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils

    out_dir = Path(out_dir).expanduser().absolute()
    check_output(out_dir, command=command, overwrite=overwrite)  # never someone's files
    old = out_dir.with_name(f".{out_dir.name}.old") if out_dir.exists() else None
    if old is not None:
        if jax.process_index() == 0:
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
        multihost_utils.sync_global_devices("moka_jax.save_orbax:aside")
    try:
        with writing(out_dir, f"{out_dir} is unchanged" if old else
                     f"nothing was written to {out_dir}"):
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(out_dir, _string_keys(local_numpy(_pure(params))), custom_metadata=meta)
            ckptr.wait_until_finished()
            ckptr.close()
    except BaseException:  # the half-written checkpoint goes, the old one comes back
        if jax.process_index() == 0:
            shutil.rmtree(out_dir, ignore_errors=True)
            if old is not None:
                old.rename(out_dir)
        raise
    if jax.process_index() == 0:
        write_marker(out_dir, command)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def _orbax_meta(path) -> dict:
    import orbax.checkpoint as ocp

    meta = ocp.StandardCheckpointer().metadata(str(Path(path).absolute())).custom_metadata or {}
    if meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{path} is an orbax checkpoint without moka_jax adapter metadata "
                              "(a training checkpoint is a directory of steps; export its adapter "
                              "with moka_jax.save_adapter)")
    return meta


def _orbax_values(path) -> dict[str, np.ndarray]:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(str(Path(path).absolute()))
    return {k: np.asarray(v) for k, v in flat_paths(tree).items()}


# ---- one reader --------------------------------------------------------------------------

def read_meta(path, llama_config=None) -> dict:
    """The adapter's meta. A PEFT directory needs the base's LlamaConfig (its keys are HF names)."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        return read_adapter_meta(path)
    if fmt == "orbax":
        return _orbax_meta(path)
    from moka_jax.io.peft_io import read_peft
    if llama_config is None:
        raise CheckpointError(f"{path}: a PEFT adapter needs the base model's config to map "
                              "its module names")
    return read_peft(path, llama_config)[0]


def read_values(path, llama_config=None) -> dict[str, np.ndarray]:
    """{path: array} of any adapter directory, every tensor checked finite (where adapter
    values enter: before they reach a model, a merge or an export)."""
    fmt = detect_format(path)
    if fmt == "safetensors":
        values = read_adapter_values(path)
    elif fmt == "orbax":
        values = _orbax_values(path)
    else:
        from moka_jax.io.peft_io import read_peft
        values = read_peft(path, llama_config)[1]
    for key, v in values.items():
        check_finite(v, f"adapter {path}: tensor {key}", "train or export the adapter again")
    return values


def load_values(path, live_params, llama_config=None):
    """The adapter's values in the structure of `live_params` (an nnx.State is updated in
    place and returned). Strict: the saved tree must equal the live one."""
    meta = read_meta(path, llama_config)
    pure = _pure(live_params)
    compare_signatures(meta["tree"], tree_signature(flat_paths(pure)), f"adapter {path}")
    values = read_values(path, llama_config)
    flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
    leaves = [values["/".join(path_key(k) for k in p)].astype(np.asarray(v).dtype) for p, v in flat]
    restored = jax.tree_util.tree_unflatten(treedef, leaves)
    if isinstance(live_params, nnx.State):
        nnx.replace_by_pure_dict(live_params, restored)
        return live_params
    return restored


# ---- one writer --------------------------------------------------------------------------

def save(out_dir, params, *, format: str = "safetensors", adapter_config: dict, targets,
         base: dict, overwrite: bool = False, model=None) -> Path:
    """Write an adapter tree in `format`. safetensors and peft are plain files written by
    process 0 only; orbax is written by every process together (call it on all of them)."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; choose one of {FORMATS}")
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not overwrite:  # on every process, before any collective
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    targets = targets if isinstance(targets, str) else list(targets)
    if format == "orbax":
        meta = {"format": ADAPTER_FORMAT, "adapter": adapter_config, "targets": targets,
                "base": base, "tree": tree_signature(flat_paths(_string_keys(_pure(params))))}
        return save_orbax(out_dir, params, meta, overwrite)
    if jax.process_index() != 0:
        return out_dir
    if format == "peft":
        from moka_jax.io.peft_io import export_peft
        if model is None:
            raise ValueError("format='peft' needs the model (its layers' Hugging Face names)")
        return export_peft(model, out_dir, (base or {}).get("path"), overwrite)
    return write_adapter(out_dir, local_numpy(_pure(params)), adapter_config=adapter_config,
                         targets=targets, base=base, overwrite=overwrite)


def to_orbax(adapter_dir, out_dir, *, model=None, overwrite: bool = False,
             command: str = "save_orbax") -> Path:
    """Any adapter directory as an orbax adapter tree; no base is loaded (a PEFT directory
    needs `model`, the base's name or directory, for its config only)."""
    config = None
    if detect_format(adapter_dir) == "peft":
        if model in (None, "random"):
            raise ValueError(f"{adapter_dir} is a PEFT adapter: give --model, the Hugging Face "
                             "base it belongs to (its config maps the module names)")
        from moka_jax.models.hf import read_config
        from moka_jax.models.source import resolve
        config = read_config(resolve(model).path)
    meta = {k: v for k, v in read_meta(adapter_dir, config).items() if k != "source"}
    values = read_values(adapter_dir, config)
    return save_orbax(out_dir, nest_paths(values), {**meta, "format": ADAPTER_FORMAT}, overwrite,
                      command=command)
