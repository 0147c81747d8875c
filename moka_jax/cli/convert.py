"""Convert a Hugging Face LLaMA directory to a quantised moka_jax checkpoint (orbax): `moka-convert`.

    moka-convert SRC DST --quant nf4|int4|none [--double-quant] [--overwrite]

SRC is a HF directory or the word `smollm2` (the embedded SmolLM2-135M-Instruct). DST holds:
    state/               orbax StandardCheckpointer: the frozen tree (4-bit leaves included)
    quant.json           static fields of each QuantizedWeight (kind, shape, block size, ...)
    moka_convert.json    dtype, quant settings, source
    config.json + tokenizer files (copied from SRC)
`moka_jax.load(DST)` and `moka-generate --model DST` load it with its own quantisation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moka_jax.cli.errors import guarded
from moka_jax.support.domains import COUNT, arg


@guarded("moka-convert", ValueError, FileNotFoundError, FileExistsError)
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="moka-convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="Hugging Face directory, or `smollm2`")
    ap.add_argument("dst")
    ap.add_argument("--quant", default="nf4", choices=("nf4", "int4", "none"))
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="float dtype of embeddings / norms / lm_head and compute "
                         "(default: f32 on CPU, bf16 on accelerators)")
    ap.add_argument("--block-size", type=arg(int, COUNT), default=64)
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    import jax.numpy as jnp

    from moka_jax.models.convert import convert

    dst = convert(args.src, args.dst, quant=args.quant,
                  dtype=jnp.dtype(args.dtype) if args.dtype else None,
                  block_size=args.block_size, double_quant=args.double_quant,
                  overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(dst).rglob("*") if f.is_file())
    print(f"wrote {dst} ({size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
