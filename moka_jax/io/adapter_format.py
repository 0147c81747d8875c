"""The moka-jax adapter file: one safetensors file whose header carries what the adapter is.

    <dir>/adapter.safetensors   keys = module paths ("layers/0/attn/q_proj/adapter/lora_a"),
                                header metadata {"moka_jax": adapter.json}
    <dir>/adapter.json          the same metadata, readable:
        {"format": ADAPTER_FORMAT, "adapter": adapter config, "targets", "base": the base
         model it was trained against, "tree": {path: [shape..., dtype]}, "data": {"template"}}

Training writes it at the end of a run; moka_jax.io.adapter_io reads it beside the orbax and
PEFT formats. It sits below both, so neither reaches into the other for the format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx

from moka_jax.support import files, outputs
from moka_jax.support.trees import CheckpointError, flat_paths, local_numpy, tree_signature

ADAPTER_FORMAT = "moka_jax.adapter/1"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_FIX = ("export the adapter again (train.py writes <run>/adapter at the end of a run; "
               "rerunning the finished run rewrites it from its last checkpoint)")


def write_adapter(out_dir, params, *, adapter_config: dict, targets, base: dict,
                  overwrite: bool = False, owner: dict | None = None,
                  data: dict | None = None) -> Path:
    """Write the adapter tree as safetensors with its config embedded as metadata.

    data: how the training text was rendered ({"template": ...}), so evaluation can prompt
    in the same format. Plain files, no cross-process barrier: call it on one process.
    Atomic (outputs.atomic_output_dir). owner: the run fingerprint; an adapter of the same
    owner is replaced without `overwrite`, one of another owner never silently.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).absolute()
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    tensors = {k: np.ascontiguousarray(v) for k, v in flat_paths(local_numpy(pure)).items()}
    meta = {"format": ADAPTER_FORMAT, "adapter": adapter_config, "targets": targets,
            "base": base, "tree": tree_signature(tensors)}
    if data is not None:
        meta["data"] = data
    with outputs.atomic_output_dir(out_dir, overwrite, command="save_adapter", owner=owner,
                                   reuse=owner is not None) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"moka_jax": json.dumps(meta)})
        (tmp / "adapter.json").write_text(json.dumps(meta, indent=2))
    return out_dir


def is_adapter_dir(path) -> bool:
    return (Path(path) / ADAPTER_FILE).is_file()


def read_adapter_meta(adapter_dir) -> dict:
    """The metadata of an adapter file, read from the safetensors header alone (no tensor)."""
    path = Path(adapter_dir) / ADAPTER_FILE
    if not path.exists():
        raise CheckpointError(f"{adapter_dir} is not a moka_jax adapter directory (no "
                              f"{ADAPTER_FILE}); export one with train.py or save_adapter")
    try:
        _, header_meta, _ = files.safetensors_header(path, fix=ADAPTER_FIX)
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
                              f"targets and tree); {ADAPTER_FIX}") from None
    return meta


def read_adapter_values(adapter_dir) -> dict[str, np.ndarray]:
    """{path: array} of an adapter file (unchecked: adapter_io.load_values checks the tree)."""
    from safetensors.numpy import load_file

    return load_file(str(Path(adapter_dir) / ADAPTER_FILE))


__all__ = ["ADAPTER_FILE", "ADAPTER_FIX", "ADAPTER_FORMAT", "is_adapter_dir", "read_adapter_meta",
           "read_adapter_values", "write_adapter"]
