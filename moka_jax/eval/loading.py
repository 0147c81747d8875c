"""Base model + optional exported adapter, checked against each other before the heavy load."""

from __future__ import annotations

import warnings
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from moka_jax import adapter_io, files, nn
from moka_jax.adapters import adapter_config_from_dict
from moka_jax.train.checkpoint import CheckpointError, _flat, compare_signatures, tree_signature

# config.json keys that decide every adapter shape.
_ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


class AdapterMismatch(ValueError):
    """An exported adapter that does not fit the requested base model."""


def resolve_model(name_or_dir) -> Path:
    """`smollm2` (the embedded default, converted once to a cached HF dir) or a HF directory."""
    if str(name_or_dir) == "smollm2":
        from moka_jax.models.gguf import ensure_smollm2
        return ensure_smollm2()
    path = Path(name_or_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {name_or_dir}: neither 'smollm2' nor a HF directory "
                                "with a config.json")
    return path


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
    live = tree_signature(_flat(nnx.to_pure_dict(nn.adapter_state(model))))
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


def load_eval_model(model: str = "smollm2", quant: str = "none", adapter=None, *,
                    dtype=jnp.float32, seed: int = 0):
    """(model, LlamaConfig, tokenizer) ready to evaluate; an adapter is checked before loading."""
    from moka_jax.data import load_tokenizer
    from moka_jax.models.hf import load_hf, read_config

    path = resolve_model(model)
    files.check_tokenizer_dir(path)  # before the weights, not after them
    if adapter is not None:
        config = read_config(path)
        meta = adapter_io.read_meta(adapter, config)
        check_adapter_base(meta, path, quant)
        precheck_adapter_shapes(config, meta, adapter)
    llama, config = load_hf(path, quant, dtype=dtype, progress=True)
    if adapter is not None:
        attach_exported_adapter(llama, adapter, seed=seed)
    return llama, config, load_tokenizer(str(path))
