"""Convert a Hugging Face LLaMA directory to a quantised moka_jax checkpoint (orbax), and load it.

    moka-convert SRC DST --quant nf4|int4|none [--double-quant] [--overwrite]   (moka_jax.cli.convert)

SRC is a HF directory or the word `smollm2` (the embedded SmolLM2-135M-Instruct). DST holds:
    state/               orbax StandardCheckpointer: the frozen tree (4-bit leaves included)
    quant.json           static fields of each QuantizedWeight (kind, shape, block size, ...)
    moka_convert.json    dtype, quant settings, source
    config.json + tokenizer files (copied from SRC)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from moka_jax.models.source import CONVERTED_MARKER, is_converted, resolve
from moka_jax.support import files
from moka_jax.support.finite import check_finite
from moka_jax.support.trees import nest_paths
from moka_jax.models.hf import (
    atomic_output_dir,
    copy_tokenizer_files,
    default_dtype,
    load_hf,
    node_at,
    read_config,
)
from moka_jax.models.llama import Llama, LlamaConfig
from moka_jax.support.outputs import check_output
from moka_jax.nn import Linear
from moka_jax.quant import QuantizedWeight

META_FILE = CONVERTED_MARKER
QUANT_FILE = "quant.json"
STATE_DIR = "state"


def _static_fields(q: QuantizedWeight) -> dict:
    return {f.name: getattr(q, f.name) for f in dataclasses.fields(q)
            if not f.metadata.get("pytree_node", True)}


def _array_fields(q: QuantizedWeight) -> dict:
    return {f.name: getattr(q, f.name) for f in dataclasses.fields(q)
            if f.metadata.get("pytree_node", True) and getattr(q, f.name) is not None}


def _frozen_leaves(model) -> dict[str, object]:
    """'a/b/c' -> value for every frozen variable (a QuantizedWeight counts as one value)."""
    flat = nnx.to_flat_state(nnx.state(model))
    return {"/".join(map(str, path)): var.get_value() for path, var in flat}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
    return out


def save_converted(model: Llama, config: LlamaConfig, dst, *, tokenizer_dir=None,
                   overwrite: bool = False, meta: dict | None = None,
                   command: str = "convert", inputs=()) -> Path:
    """Write the model's frozen tree with orbax plus config / tokenizer; atomic like save_hf."""
    import orbax.checkpoint as ocp

    if any(isinstance(node, Linear) and node.adapter is not None
           for _, node in nnx.iter_graph(model)):
        raise ValueError("save_converted stores the frozen base only; this model has adapters "
                         "(save them with the training checkpoint, or merge with save_hf)")
    arrays, quant_meta = {}, {}
    for path, value in _frozen_leaves(model).items():
        if isinstance(value, QuantizedWeight):
            quant_meta[path] = _static_fields(value)
            arrays.update({f"{path}/{k}": v for k, v in _array_fields(value).items()})
        else:
            arrays[path] = value
    with atomic_output_dir(dst, overwrite, command=command,
                           inputs=[tokenizer_dir, *inputs]) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(tmp / STATE_DIR, nest_paths(arrays))
        ckpt.wait_until_finished()
        (tmp / QUANT_FILE).write_text(json.dumps(quant_meta, indent=1))
        (tmp / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        info = {"dtype": jnp.dtype(model.dtype).name, **(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(info, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(dst)


def load_converted(path, *, remat: bool = False) -> tuple[Llama, LlamaConfig]:
    """The model written by save_converted / convert (no random init, no re-quantisation)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not is_converted(path):
        raise FileNotFoundError(f"{path / META_FILE}: missing; not a `moka-convert` "
                                f"output directory")
    fix = "run `moka-convert SRC DST --overwrite` again to rebuild it"
    info = files.read_json_object(path / META_FILE, "convert metadata", fix)
    dtype = jnp.dtype(info.get("dtype", "float32"))
    config = read_config(path)
    quant_meta = files.read_json_object(path / QUANT_FILE, "quantisation metadata", fix)
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, param_dtype=dtype, remat=remat,
                                         rngs=nnx.Rngs(0)))
    files.require_dir(path / STATE_DIR, "orbax state directory", fix)
    try:
        arrays = _flatten(ocp.StandardCheckpointer().restore(path / STATE_DIR))
    except Exception as e:  # tensorstore / orbax errors name an internal key, not what to do
        raise files.FileCheckError(path / STATE_DIR, "the converted weights cannot be read "
                                   f"({str(e).splitlines()[0][:300]})", fix) from None
    for var_path in _frozen_leaves(model):
        if var_path in quant_meta:
            static = dict(quant_meta[var_path])
            static["shape"] = tuple(static["shape"])
            leaves = {k.rsplit("/", 1)[1]: v for k, v in arrays.items()
                      if k.rsplit("/", 1)[0] == var_path}
            for k, v in leaves.items():  # the scales; the 4-bit codes hold no NaN
                check_finite(v, f"{path / STATE_DIR}: {var_path}/{k}", fix)
            value = QuantizedWeight(**leaves, **static)
            # The skeleton was built dense; the Linear dispatches on the kernel's type.
            layer = node_at(model, var_path.rsplit("/", 1)[0])
            layer.quant = value.kind
        elif var_path in arrays:
            value = check_finite(arrays[var_path], f"{path / STATE_DIR}: {var_path}", fix)
        else:
            raise ValueError(f"{path / STATE_DIR}: no array for {var_path}")
        node_at(model, var_path).set_value(value)
    return model, config


def convert(src, dst, *, quant: str = "nf4", dtype=None, block_size: int = 64,
            double_quant: bool = False, overwrite: bool = False, progress: bool = True) -> Path:
    source = resolve(src)
    if source.kind != "hf":
        raise ValueError(f"convert: {src} is a {source.kind} model, not a Hugging Face directory")
    src = source.path
    # Before the heavy work, not after it; never over the source, whatever overwrite says.
    check_output(dst, command="convert", inputs=[src], overwrite=overwrite)
    dtype = dtype or default_dtype()
    model, config = load_hf(src, quant, dtype=dtype, block_size=block_size,
                            double_quant=double_quant, progress=progress)
    meta = {"quant": quant, "block_size": block_size, "double_quant": double_quant,
            "source": str(Path(src).absolute())}
    return save_converted(model, config, dst, tokenizer_dir=src, overwrite=overwrite, meta=meta,
                          inputs=[src])


def frozen_nbytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
