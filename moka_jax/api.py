"""The one-call API: load a base (+ adapter), save an adapter, merge, summarise.

    model, tok = moka_jax.load("smollm2", adapter="runs/x/adapter", quant="nf4")
    moka_jax.summary(model)                       # trainable / total / % per kind and target
    moka_jax.save_adapter(model, "out/", format="peft")
    merged = moka_jax.merge(model)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np

from moka_jax import nn, quant as quant_lib
from moka_jax.adapters import adapter_config_to_dict


def _tiny_model(tiny: dict | None, quant: str, dtype, block_size: int, double_quant: bool):
    from moka_jax.config import Config, ModelConfig, TinyModelConfig
    from moka_jax.train.loop import build_base_model

    dtype_name = {np.dtype("float32"): "float32"}.get(np.dtype(dtype), "bfloat16")
    cfg = Config(model=ModelConfig(path="random", tokenizer="bytes", quant=quant,
                                   block_size=block_size, double_quant=double_quant,
                                   dtype=dtype_name, tiny=TinyModelConfig(**(tiny or {}))))
    return build_base_model(cfg, None)[0]


def load(base, adapter=None, quant: str | None = "nf4", dtype=None, *, tokenizer=None,
         seed: int = 0):
    """(model, tokenizer), ready to generate, score or train (the adapter stays trainable).

    base: "smollm2" (the embedded SmolLM2-135M-Instruct), a Hugging Face directory, a
    `moka_jax.convert` directory (keeps its own quantisation), or "random" (the tiny random
    LLaMA of configs/tiny-debug.yaml; with an adapter trained on it, that adapter's one).
    adapter: a moka-jax adapter directory, an orbax adapter tree or a PEFT LoRA / DoRA
    directory; its base, targets and shapes are checked before the weights are read.
    quant: "nf4" | "int4" | "none", or None for the quantisation the adapter was trained on.
    dtype: compute dtype (default float32 on CPU, bfloat16 on accelerators).
    tokenizer: None (the base's own; the byte tokenizer for "random"), "bytes", "smollm2" or
    a directory. None is returned when the base directory has no tokenizer files.
    """
    from moka_jax import adapter_io
    from moka_jax.data import load_tokenizer
    from moka_jax.eval import loading
    from moka_jax.models.hf import default_dtype, load_hf, read_config

    if quant not in (None, "none", *quant_lib.QUANT_KINDS):
        raise ValueError(f"quant={quant!r}; choose None (the adapter's), 'none' or one of "
                         f"{quant_lib.QUANT_KINDS}")
    dtype = dtype or default_dtype()
    meta, config = None, None
    path = None if str(base) == "random" else loading.resolve_model(base)
    if path is not None and not _is_converted(path):
        config = read_config(path)
    if adapter is not None:
        meta = adapter_io.read_meta(adapter, config)
    trained = (meta or {}).get("base") or {}
    q = quant or trained.get("quant") or "nf4"
    block_size = trained.get("block_size", 64)
    double_quant = trained.get("double_quant", False)
    if path is None:
        model = _tiny_model(trained.get("tiny"), q, dtype, block_size, double_quant)
        tok_spec = tokenizer or "bytes"
    elif _is_converted(path):
        from moka_jax.convert import load_converted
        model, _ = load_converted(path)
        tok_spec = tokenizer or (str(path) if _has_tokenizer(path) else None)
    else:
        if meta is not None:
            loading.check_adapter_base(meta, path, q)
            loading.precheck_adapter_shapes(config, meta, adapter)
        model, _ = load_hf(path, q, dtype=dtype, block_size=block_size,
                           double_quant=double_quant)
        tok_spec = tokenizer or (str(path) if _has_tokenizer(path) else None)
    if adapter is not None:
        loading.attach_exported_adapter(model, adapter, seed=seed)
    tiny = None
    if path is None:
        from moka_jax.config import TinyModelConfig
        tiny = trained.get("tiny") or dataclasses.asdict(TinyModelConfig())
    # Static (hashable) model data: what save_adapter records as the adapter's base.
    model.moka_base = json.dumps({"path": "random" if path is None else str(path), "quant": q,
                                  "block_size": block_size, "double_quant": double_quant,
                                  "tiny": tiny})
    return model, (None if tok_spec is None else load_tokenizer(tok_spec))


def _is_converted(path) -> bool:
    from moka_jax.convert import is_converted
    return is_converted(path)


def _has_tokenizer(path) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model",
                                                     "tokenizer_config.json"))


def base_info(model) -> dict:
    """What changes the (dequantised) base an adapter is trained against, for its metadata."""
    recorded = json.loads(getattr(model, "moka_base", None) or "{}")
    for _, layer in nn.linear_paths(model):
        k = layer.kernel.get_value()
        if isinstance(k, quant_lib.QuantizedWeight):
            inferred = {"quant": k.kind, "block_size": k.block_size,
                        "double_quant": bool(k.double_quant)}
            if k.kind == "int4":
                inferred["int4_symmetric"] = bool(k.symmetric)
            break
    else:
        inferred = {"quant": "none"}
    return {"path": None, "tiny": None, **recorded, **inferred}


def _attached(model):
    specs = tuple(getattr(model, "moka_adapters", ()) or ())
    if not specs:
        raise ValueError("the model has no adapters attached by moka_jax.attach_adapters / load")
    return specs


def save_adapter(model, out_dir, *, format: str = "safetensors", base: dict | None = None,
                 overwrite: bool = False) -> Path:
    """Write the model's adapter: "safetensors" (moka-jax's own, what eval / export / load
    read), "orbax" (the adapter tree as an orbax checkpoint; on a multi-host run call it on
    every process) or "peft" (a PEFT directory, see moka_jax.peft_io)."""
    from moka_jax import adapter_io

    specs = _attached(model)
    if format != "peft" and len(specs) != 1:
        raise ValueError(f"the model has {len(specs)} attach_adapters calls ({specs}); a "
                         "moka-jax adapter records one adapter config and one targets; "
                         "use format='peft' or attach once")
    config, targets = specs[0]
    return adapter_io.save(out_dir, nn.adapter_state(model), format=format,
                           adapter_config=adapter_config_to_dict(config), targets=targets,
                           base=base or base_info(model), overwrite=overwrite, model=model)


def merge(model, requantize: str | None = None):
    """A copy with every adapter folded into its dequantised base (dense, or re-quantised)."""
    from moka_jax.export import merge_model
    return merge_model(model, requantize=requantize)


def summary(model, *, print_fn=print) -> dict:
    """Trainable / total / % per adapter kind and target, like PEFT's print_trainable_parameters.

    Returns {"trainable", "total", "percent", "rows": [{kind, target, layers, trainable}]};
    total counts the frozen base by its original (unquantised) shape plus the adapters.
    """
    rows: dict[tuple, dict] = {}
    for path, layer in nn.linear_paths(model):
        if layer.adapter is None:
            continue
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
            nn.nnx.state(layer.adapter, nn.AdapterParam)))
        key = (type(layer.adapter).__name__, path.rsplit("/", 1)[-1])
        row = rows.setdefault(key, {"kind": key[0], "target": key[1], "layers": 0,
                                    "trainable": 0})
        row["layers"] += 1
        row["trainable"] += n
    trainable = nn.count_params(model)
    total = nn.base_param_count(model) + trainable
    out = {"trainable": trainable, "total": total,
           "percent": 100.0 * trainable / total if total else 0.0, "rows": list(rows.values())}
    if print_fn is not None:
        lines = [f"{'kind':<6} {'target':<12} {'layers':>6} {'trainable':>12} {'% of total':>10}"]
        for r in out["rows"]:
            lines.append(f"{r['kind']:<6} {r['target']:<12} {r['layers']:>6} "
                         f"{r['trainable']:>12,} {100 * r['trainable'] / total:>10.4f}")
        lines.append(f"trainable params: {trainable:,} || all params: {total:,} || "
                     f"trainable%: {out['percent']:.4f}")
        print_fn("\n".join(lines))
    return out


__all__ = ["load", "merge", "save_adapter", "summary"]
