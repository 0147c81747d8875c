"""Merge an adapter into its base, or convert the adapter: `moka-export`.

    moka-export --model smollm2|DIR|random --adapter ADAPTER_DIR --out DIR \
        [--format hf|peft|orbax] [--requantize nf4] [--overwrite]

--format hf           a Hugging Face directory (merged weights) that transformers loads;
  with --requantize   the merged model re-quantised to 4 bits, written as a `moka-convert`
                      directory (orbax; `moka-generate --model DIR` loads it),
                      because a Hugging Face directory holds no moka_jax 4-bit weights.
--format peft         a PEFT directory `peft.PeftModel.from_pretrained(hf_model, DIR)` loads:
                      LoRA / DoRA as a LoRA adapter, MoKA as one LoKr adapter per component
                      (moka_jax.io.peft_io.load_peft_model activates them all). What PEFT cannot
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

from moka_jax.api import merge
from moka_jax.cli.errors import guarded
from moka_jax.quant import QUANT_KINDS

FORMATS = ("hf", "peft", "orbax", "peft-lokr")  # peft-lokr: the old name of peft


def load_adapted(model_spec: str, adapter_dir):
    """(model with the trained adapter, LlamaConfig, base directory or None for "random").

    The base is loaded in float32 with the quantisation it was trained on (the adapter's
    metadata), so merging folds dW into the same dequantised weights.
    """
    import jax.numpy as jnp

    from moka_jax.api import load

    model, _ = load(model_spec, adapter_dir, quant=None, dtype=jnp.float32)
    path = json.loads(model.moka_base)["path"]
    return model, model.config, (None if path == "random" else Path(path))


def run(args) -> Path:
    fmt = {"peft-lokr": "peft"}.get(args.format, args.format)
    if fmt != "hf" and args.requantize:
        raise ValueError("--requantize applies to --format hf only (an adapter has no base)")
    from moka_jax.models.source import resolve_dir
    from moka_jax.support.outputs import check_output

    command = "export-requantize" if args.requantize else f"export-{fmt}"
    model_dir = None if args.model is None else resolve_dir(args.model)
    inputs = [Path(args.adapter), model_dir]
    # Before the heavy work; never over the adapter or the base, whatever --overwrite says.
    check_output(args.out, command=command, inputs=inputs, overwrite=args.overwrite)
    if fmt == "orbax":
        from moka_jax.io.adapter_io import to_orbax
        return to_orbax(args.adapter, args.out, model=args.model, overwrite=args.overwrite,
                        command=command)
    model, config, tok_dir = load_adapted(args.model, args.adapter)
    if fmt == "peft":
        from moka_jax.io.peft_io import export_peft
        return export_peft(model, args.out, str(tok_dir or args.model), args.overwrite,
                           command=command)
    if args.requantize:
        from moka_jax.models.convert import save_converted
        merged = merge(model, requantize=args.requantize)
        meta = {"quant": args.requantize, "merged_adapter": str(Path(args.adapter).absolute()),
                "source": str(tok_dir or args.model)}
        return save_converted(merged, config, args.out, tokenizer_dir=tok_dir,
                              overwrite=args.overwrite, meta=meta, command=command, inputs=inputs)
    from moka_jax.io.export import export_hf
    return export_hf(model, config, args.out, tok_dir, args.overwrite, inputs=inputs)


@guarded("moka-export", ValueError, FileNotFoundError, FileExistsError)
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
    ap.add_argument("--requantize", default=None, choices=QUANT_KINDS)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.model is None and args.format != "orbax":
        ap.error(f"--model is required for --format {args.format}")
    out = run(args)
    print(json.dumps({"out": str(out), "format": args.format, "requantize": args.requantize}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
