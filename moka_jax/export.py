"""Merge adapters into the base; export to Hugging Face, PEFT or an orbax adapter tree.

    python -m moka_jax.export --model smollm2|DIR|random --adapter ADAPTER_DIR --out DIR \
        [--format hf|peft|orbax] [--requantize nf4] [--overwrite]

--format hf           a Hugging Face directory (merged weights) that transformers loads;
  with --requantize   the merged model re-quantised to 4 bits, written as a `moka_jax.convert`
                      directory (orbax; `python -m moka_jax.generate --model DIR` loads it),
                      because a Hugging Face directory holds no moka_jax 4-bit weights.
--format peft         a PEFT directory `peft.PeftModel.from_pretrained(hf_model, DIR)` loads:
                      LoRA / DoRA as a LoRA adapter, MoKA as one LoKr adapter per component
                      (moka_jax.peft_io.load_peft_model activates them all). What PEFT cannot
                      express is refused before anything is written, naming the layer.
--format orbax        the adapter tree as an orbax checkpoint with its config in the metadata
                      (no base model needed for a moka-jax adapter).

Merging always folds dW into the DEQUANTISED base weight: that is the weight the adapter was
trained against, not the original full-precision one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from moka_jax import quant as quant_lib
from moka_jax.models.hf import node_at, save_hf
from moka_jax.nn import Linear, linear_paths

FORMATS = ("hf", "peft", "orbax", "peft-lokr")  # peft-lokr: the old name of peft


# ---- merge ----------------------------------------------------------------------------------

def _merged_linear(layer: Linear, requantize: str | None) -> Linear:
    """An adapter-free Linear holding W0 (dequantised) + dW, dense or re-quantised."""
    w = np.asarray(layer.merged_weight(jnp.float32))  # dW is materialised once, here
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
            _set_node(merged, path, _merged_linear(layer, requantize))
    return merged


def export_hf(model, config, out_dir, tokenizer_dir=None, overwrite: bool = False, *,
              merged: bool = True, dtype=np.float32, inputs=()) -> Path:
    """A Hugging Face directory transformers loads: merged weights (or the base alone with
    merged=False). Refuses an existing out_dir unless overwrite; written atomically."""
    return save_hf(model, config, out_dir, tokenizer_dir=tokenizer_dir, merged=merged,
                   dtype=dtype, overwrite=overwrite, command="export-hf", inputs=inputs)


# ---- CLI --------------------------------------------------------------------------------------

def load_adapted(model_spec: str, adapter_dir):
    """(model with the trained adapter, LlamaConfig, base directory or None for "random").

    The base is loaded in float32 with the quantisation it was trained on (the adapter's
    metadata), so merging folds dW into the same dequantised weights.
    """
    from moka_jax.api import load

    model, _ = load(model_spec, adapter_dir, quant=None, dtype=jnp.float32)
    path = json.loads(model.moka_base)["path"]
    return model, model.config, (None if path == "random" else Path(path))


def run(args) -> Path:
    fmt = {"peft-lokr": "peft"}.get(args.format, args.format)
    if fmt != "hf" and args.requantize:
        raise ValueError("--requantize applies to --format hf only (an adapter has no base)")
    from moka_jax.convert import resolve_source
    from moka_jax.outputs import check_output

    command = "export-requantize" if args.requantize else f"export-{fmt}"
    model_dir = None if args.model in (None, "random") else resolve_source(args.model)
    inputs = [Path(args.adapter), model_dir]
    # Before the heavy work; never over the adapter or the base, whatever --overwrite says.
    check_output(args.out, command=command, inputs=inputs, overwrite=args.overwrite)
    if fmt == "orbax":
        from moka_jax.adapter_io import to_orbax
        return to_orbax(args.adapter, args.out, model=args.model, overwrite=args.overwrite)
    model, config, tok_dir = load_adapted(args.model, args.adapter)
    if fmt == "peft":
        from moka_jax.peft_io import export_peft
        return export_peft(model, args.out, str(tok_dir or args.model), args.overwrite)
    if args.requantize:
        from moka_jax.convert import save_converted
        merged = merge_model(model, requantize=args.requantize)
        meta = {"quant": args.requantize, "merged_adapter": str(Path(args.adapter).absolute()),
                "source": str(tok_dir or args.model)}
        return save_converted(merged, config, args.out, tokenizer_dir=tok_dir,
                              overwrite=args.overwrite, meta=meta, command=command, inputs=inputs)
    return export_hf(model, config, args.out, tok_dir, args.overwrite, inputs=inputs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moka-export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="base model: `smollm2`, a Hugging Face directory, or `random` (tiny); "
                         "not needed for --format orbax from a moka-jax adapter")
    ap.add_argument("--adapter", required=True, help="adapter directory: written by training "
                    "or moka_jax.save_adapter (safetensors / orbax), or a PEFT LoRA / DoRA one")
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", default="hf", choices=FORMATS)
    ap.add_argument("--requantize", default=None, choices=quant_lib.QUANT_KINDS)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.model is None and args.format != "orbax":
        ap.error(f"--model is required for --format {args.format}")
    try:
        out = run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "format": args.format, "requantize": args.requantize}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
