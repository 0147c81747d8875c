"""An exported adapter onto a base model, checked against it before any tensor is read.

    meta = adapter_io.read_meta(adapter_dir, llama_config)
    check_adapter_base(meta, model_dir, quant)            # the base it was trained on
    precheck_adapter_shapes(llama_config, meta, adapter_dir)  # on an abstract model
    attach_exported_adapter(model, adapter_dir)           # config, targets, values
"""

from __future__ import annotations

import warnings
from pathlib import Path

from flax import nnx

from moka_jax import nn
from moka_jax.adapters import adapter_config_from_dict
from moka_jax.io import adapter_io
from moka_jax.support import files
from moka_jax.support.trees import (CheckpointError, compare_signatures, flat_paths,
                                    tree_signature)

# config.json keys that decide every adapter shape.
_ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
              "model_type")


class AdapterMismatch(ValueError):
    """An exported adapter that does not fit the requested base model."""


def _config_dict(path: Path) -> dict | None:
    file = Path(path) / "config.json"
    return files.read_json_object(file, "model config") if file.is_file() else None


def check_adapter_base(meta: dict, model_dir, quant: str) -> None:
    """AdapterMismatch when the adapter's recorded base is not this model (config.json only)."""
    base = meta.get("base") or {}
    if base.get("tiny") is not None:
        raise AdapterMismatch(f"adapter base is the random tiny model ({base['tiny']}), "
                              f"not {model_dir}")
    saved = Path(str(base.get("path") or ""))
    if base.get("path") and saved.resolve() != Path(model_dir).resolve():
        a, b = _config_dict(saved), _config_dict(model_dir)
        if a is not None and b is not None:
            diff = [f"{k}: adapter base {a.get(k)!r} vs model {b.get(k)!r}" for k in _ARCH_KEYS
                    if a.get(k) != b.get(k)]
            if diff:
                raise AdapterMismatch(f"adapter base {saved} differs from model {model_dir}:\n  "
                                      + "\n  ".join(diff))
        elif saved.name != Path(model_dir).name:
            # Trained elsewhere: the shape check below is then the only guard.
            warnings.warn(f"adapter was trained on {saved} (not found here); evaluating on "
                          f"{model_dir}: only the adapter shapes can be checked")
    if base.get("quant") not in (None, quant):
        warnings.warn(f"adapter was trained on a {base['quant']} base; evaluating with "
                      f"quant={quant}")


def _attach(model, meta: dict, adapter_dir, seed: int, shapes_only: bool) -> list[str]:
    config = adapter_config_from_dict(meta["adapter"])
    try:
        paths = nn.attach_adapters(model, config, meta["targets"], rngs=nnx.Rngs(params=seed))
    except ValueError as e:
        raise AdapterMismatch(f"adapter {adapter_dir}: {e}") from None
    saved = meta["tree"]
    live = tree_signature(flat_paths(nnx.to_pure_dict(nn.adapter_state(model))))
    if shapes_only:  # an abstract model's dtypes need not be the loaded one's
        saved, live = ({k: v[:-1] for k, v in d.items()} for d in (saved, live))
    try:
        compare_signatures(saved, live, f"adapter {adapter_dir}")
    except CheckpointError as e:
        raise AdapterMismatch(str(e)) from None
    return paths


def attach_exported_adapter(model, adapter_dir, *, seed: int = 0) -> list[str]:
    """Attach the adapter config / targets recorded in `adapter_dir` (moka-jax safetensors,
    orbax or a PEFT LoRA / DoRA directory) and load its values.

    Returns the adapted layer paths. AdapterMismatch names the paths / shapes that differ.
    """
    config = getattr(model, "config", None)
    meta = adapter_io.read_meta(adapter_dir, config)
    paths = _attach(model, meta, adapter_dir, seed, shapes_only=False)
    nnx.update(model, adapter_io.load_values(adapter_dir, nn.adapter_state(model), config))
    return paths


def precheck_adapter_shapes(config, meta: dict, adapter_dir) -> None:
    """The adapter tree against an abstract (weightless) model: fails before any tensor is read."""
    from moka_jax.models.llama import Llama

    def build():
        m = Llama(config, quant="none", rngs=nnx.Rngs(0))
        _attach(m, meta, adapter_dir, 0, shapes_only=True)
        return m

    nnx.eval_shape(build)


__all__ = ["AdapterMismatch", "attach_exported_adapter", "check_adapter_base",
           "precheck_adapter_shapes"]
