"""Merge adapters into the base, export to Hugging Face, and export MoKA as a PEFT LoKr adapter.

    python -m moka_jax.export --model smollm2|DIR|random --adapter ADAPTER_DIR --out DIR \
        [--format hf|peft-lokr] [--requantize nf4] [--overwrite]

--format hf           a Hugging Face directory (merged weights) that transformers loads;
  with --requantize   the merged model re-quantised to 4 bits, written as a `moka_jax.convert`
                      directory (orbax; `python -m moka_jax.generate --model DIR` loads it),
                      because a Hugging Face directory holds no moka_jax 4-bit weights.
--format peft-lokr    adapter_config.json + adapter_model.safetensors that
                      `peft.PeftModel.from_pretrained(hf_model, DIR)` loads (single-component
                      MoKA only; the same factor shapes on every layer PEFT can express).

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
from moka_jax.adapters import MoKA
from moka_jax.models.hf import atomic_output_dir, hf_tensor_specs, node_at, save_hf
from moka_jax.nn import Linear, linear_paths

FORMATS = ("hf", "peft-lokr")


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


# ---- PEFT LoKr --------------------------------------------------------------------------------

def peft_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft.tuners.lokr.layer.factorization (0.21.2), copied so the export needs no peft."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def _lokr_factors(path: str, adapter) -> tuple[np.ndarray, np.ndarray]:
    """(w1, w2) with kron(w1, w2) == dW exactly, or a ValueError naming the layer and why."""
    if not isinstance(adapter, MoKA):
        raise ValueError(f"layer '{path}': a {type(adapter).__name__} adapter; PEFT LoKr export "
                         "needs a single-component MoKA (adapter.kind=moka, r=1)")
    if adapter.r != 1:
        raise ValueError(f"layer '{path}': MoKA has {adapter.r} components; a PEFT LoKr adapter "
                         "holds exactly one Kronecker product (train with adapter.r=1, "
                         "adapter.gated=false)")
    a, b = (np.asarray(x, np.float32) for x in adapter.components()[0])
    (ma, na), (mb, nb) = a.shape, b.shape
    if ma * mb != adapter.m or na * nb != adapter.n:
        raise ValueError(f"layer '{path}': MoKA shapes A {a.shape} x B {b.shape} pad / truncate "
                         f"to ({adapter.m}, {adapter.n}); PEFT LoKr needs factors whose "
                         "Kronecker product is exactly the weight's shape")
    # One component: the ungated weight is 1/r = 1, and softmax of a single logit is exactly
    # 1 too, so both variants are w1 = scale * A. LoKr's own alpha / r is set to 1.
    weight = float(np.asarray(adapter.alpha())[0]) * adapter.scale
    return weight * a, b


def _choose_decompose_factor(shapes: dict[str, tuple]) -> int:
    """The one decompose_factor for which PEFT builds w1 / w2 of our shapes on every layer."""
    def fits(f):
        return all((peft_factorization(m, f)[0], peft_factorization(n, f)[0]) == w1
                   for (m, n), w1 in shapes.values())

    biggest = max(max(w1) for _, w1 in shapes.values())
    for f in [-1, *range(1, 2 * biggest + 2)]:
        if fits(f):
            return f
    lines = [f"  {p}: weight {mn}, w1 {w1}, PEFT (factor -1) would build "
             f"{(peft_factorization(mn[0])[0], peft_factorization(mn[1])[0])}"
             for p, (mn, w1) in list(shapes.items())[:5]]
    raise ValueError("PEFT LoKr picks its factor shapes from one decompose_factor for all "
                     "layers; no value reproduces these MoKA shapes:\n" + "\n".join(lines))


def lokr_tensors(model) -> tuple[dict[str, np.ndarray], dict]:
    """({PEFT state-dict key: array}, adapter_config dict) for a single-component MoKA model."""
    hf_module = {s.path: s.hf_name.removesuffix(".weight") for s in
                 hf_tensor_specs(model.config) if s.kind == "linear"}
    tensors, shapes, modules = {}, {}, []
    for path, layer in linear_paths(model):
        if layer.adapter is None:
            continue
        w1, w2 = _lokr_factors(path, layer.adapter)
        name = hf_module[path]
        tensors[f"base_model.model.{name}.lokr_w1"] = np.ascontiguousarray(w1)
        tensors[f"base_model.model.{name}.lokr_w2"] = np.ascontiguousarray(w2)
        shapes[path] = ((layer.out_features, layer.in_features), w1.shape)
        modules.append(name)
    if not modules:
        raise ValueError("the model has no adapters to export")
    factor = _choose_decompose_factor(shapes)
    # PEFT keeps w2 a full matrix only when r >= max(w2 dims) / 2; alpha = r makes the scaling
    # alpha / r exactly 1 (MoKA's scale is already in w1).
    r = max(max(t.shape) for k, t in tensors.items() if k.endswith("lokr_w2"))
    config = {"peft_type": "LOKR", "task_type": "CAUSAL_LM", "r": r, "alpha": r,
              "target_modules": modules, "decompose_both": False, "decompose_factor": factor,
              "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True,
              "use_effective_conv2d": False, "inference_mode": True}
    return tensors, config


def export_peft_lokr(model, out_dir, base_model_name_or_path: str | None,
                     overwrite: bool = False, *, inputs=()) -> Path:
    """A PEFT LoKr adapter directory equal to the model's single-component MoKA adapters.

    PEFT applies it to whatever base it is loaded on: use the dequantised base (export_hf with
    merged=False) to reproduce a model trained on a 4-bit base exactly.
    """
    from safetensors.numpy import save_file

    tensors, config = lokr_tensors(model)  # all checks before anything is written
    config["base_model_name_or_path"] = base_model_name_or_path
    with atomic_output_dir(out_dir, overwrite, command="export-peft-lokr", inputs=inputs) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out_dir)


# ---- CLI --------------------------------------------------------------------------------------

def load_adapted(model_spec: str, adapter_dir, *, block_size: int | None = None,
                 double_quant: bool | None = None):
    """(model with the trained adapter, LlamaConfig, tokenizer dir or None).

    The base is loaded with the quantisation it was trained on (from the adapter's metadata),
    so merging folds dW into the same dequantised weights.
    """
    from moka_jax import nn
    from moka_jax.adapters import adapter_config_from_dict
    from moka_jax.train.checkpoint import load_adapter_params, read_adapter_meta

    meta = read_adapter_meta(adapter_dir)
    base = meta.get("base") or {}
    q = base.get("quant", "nf4")
    bs = block_size or base.get("block_size", 64)
    dq = base.get("double_quant", False) if double_quant is None else double_quant
    if model_spec == "random":
        if not base.get("tiny"):
            raise ValueError(f"{adapter_dir}: --model random needs an adapter trained on the "
                             "random tiny model (its metadata has no base.tiny)")
        from moka_jax.config import Config, ModelConfig, TinyModelConfig
        from moka_jax.train.loop import build_base_model
        cfg = Config(model=ModelConfig(path="random", tokenizer="bytes", quant=q, block_size=bs,
                                       double_quant=dq, dtype="float32",
                                       tiny=TinyModelConfig(**base["tiny"])))
        model, config = build_base_model(cfg, None)
        tok_dir = None
    else:
        from moka_jax.convert import resolve_source
        from moka_jax.models.hf import load_hf
        tok_dir = resolve_source(model_spec)
        if base.get("path") not in (None, "random", str(tok_dir), model_spec):
            print(f"warning: the adapter was trained on {base['path']}, exporting on {tok_dir}",
                  file=sys.stderr)
        model, config = load_hf(tok_dir, q, dtype=jnp.float32, block_size=bs, double_quant=dq)
    nn.attach_adapters(model, adapter_config_from_dict(meta["adapter"]), meta["targets"],
                       rngs=nnx.Rngs(0))
    nnx.update(model, load_adapter_params(adapter_dir, nn.adapter_state(model)))
    return model, config, tok_dir


def run(args) -> Path:
    if args.format == "peft-lokr" and args.requantize:
        raise ValueError("--requantize applies to --format hf only (a LoKr adapter has no base)")
    from moka_jax.convert import resolve_source
    from moka_jax.outputs import check_output

    command = {"peft-lokr": "export-peft-lokr"}.get(args.format, "export-hf")
    command = "export-requantize" if args.requantize else command
    model_dir = None if args.model == "random" else resolve_source(args.model)
    inputs = [Path(args.adapter), model_dir]
    # Before the heavy work; never over the adapter or the base, whatever --overwrite says.
    check_output(args.out, command=command, inputs=inputs, overwrite=args.overwrite)
    model, config, tok_dir = load_adapted(args.model, args.adapter)
    if args.format == "peft-lokr":
        return export_peft_lokr(model, args.out, str(tok_dir or args.model), args.overwrite,
                                inputs=inputs)
    if args.requantize:
        from moka_jax.convert import save_converted
        merged = merge_model(model, requantize=args.requantize)
        meta = {"quant": args.requantize, "merged_adapter": str(Path(args.adapter).absolute()),
                "source": str(tok_dir or args.model)}
        return save_converted(merged, config, args.out, tokenizer_dir=tok_dir,
                              overwrite=args.overwrite, meta=meta, command=command, inputs=inputs)
    return export_hf(model, config, args.out, tok_dir, args.overwrite, inputs=inputs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moka_jax.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="base model: `smollm2`, a Hugging Face directory, or `random` (tiny)")
    ap.add_argument("--adapter", required=True, help="adapter directory written by training")
    ap.add_argument("--out", required=True)
    ap.add_argument("--format", default="hf", choices=FORMATS)
    ap.add_argument("--requantize", default=None, choices=quant_lib.QUANT_KINDS)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "format": args.format, "requantize": args.requantize}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
