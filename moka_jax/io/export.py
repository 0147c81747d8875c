"""Merge adapters into the base and write the merged model as a Hugging Face directory.

The command line (`moka-export`: hf, re-quantised, PEFT, orbax) is moka_jax.cli.export.

Merging always folds dW into the DEQUANTISED base weight: that is the weight the adapter was
trained against, not the original full-precision one.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moka_jax import quant as quant_lib
from moka_jax.models.hf import node_at, save_hf
from moka_jax.nn import Linear, linear_paths
from moka_jax.support.finite import check_finite

def _merged_linear(layer: Linear, requantize: str | None, path: str) -> Linear:
    """An adapter-free Linear holding W0 (dequantised) + dW, dense or re-quantised."""
    w = check_finite(np.asarray(layer.merged_weight(jnp.float32)),  # dW materialised once
                     f"{path}: the base weight with the adapter merged in",
                     "check the adapter (moka-export names its tensors when it loads it)")
    bias = None if layer.bias is None else layer.bias.get_value()
    k = layer.kernel.get_value()
    if requantize is not None:
        qw = k if isinstance(k, quant_lib.QuantizedWeight) else None
        return Linear.from_weight(w, bias, quant=requantize,
                                  block_size=qw.block_size if qw else 64,
                                  double_quant=bool(qw and qw.double_quant), dtype=layer.dtype,
                                  name=layer.name)
    # A dense base keeps its storage dtype; a 4-bit one becomes dense in the compute dtype.
    param_dtype = (layer.dtype or jnp.float32) if isinstance(k, quant_lib.QuantizedWeight) \
        else k.dtype
    return Linear.from_weight(w, bias, dtype=layer.dtype, param_dtype=param_dtype, name=layer.name)


def _set_node(model, path: str, value):
    parent_path, _, name = path.rpartition("/")
    parent = node_at(model, parent_path) if parent_path else model
    if name.isdigit():
        parent[int(name)] = value
    else:
        setattr(parent, name, value)


def merge_model(model, requantize: str | None = None):
    """A copy of `model` with every adapter folded into its (dequantised) base weight.

    requantize: None (merged layers become dense) or "nf4" / "int4" (re-quantised, with the
    original block size where the base was 4-bit). Layers without an adapter are shared as-is.
    """
    if requantize is not None and requantize not in quant_lib.QUANT_KINDS:
        raise ValueError(f"requantize={requantize!r}; choose None or one of "
                         f"{quant_lib.QUANT_KINDS}")
    merged = nnx.clone(model)  # shares the (immutable) arrays, not a second copy of the base
    for path, layer in linear_paths(merged):
        if layer.adapter is not None:
            _set_node(merged, path, _merged_linear(layer, requantize, path))
    return merged


def export_hf(model, config, out_dir, tokenizer_dir=None, overwrite: bool = False, *,
              merged: bool = True, dtype=np.float32, inputs=()) -> Path:
    """A Hugging Face directory transformers loads: merged weights (or the base alone with
    merged=False). Refuses an existing out_dir unless overwrite; written atomically."""
    return save_hf(model, config, out_dir, tokenizer_dir=tokenizer_dir, merged=merged,
                   dtype=dtype, overwrite=overwrite, command="export-hf", inputs=inputs)
