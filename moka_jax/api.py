"""The one-call API: load a base (+ adapter), save an adapter, merge, summarise.

It sits above io and below training, evaluation and the commands, so every one of them loads
through the same `load`.

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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moka_jax import nn
from moka_jax import quant as quant_lib
from moka_jax.adapters import adapter_config_to_dict
from moka_jax.models.llama import Llama, check_tokenizer_vocab


# The random base is seeded apart from any adapter seed: changing the adapter init seed must not
# change the "pretrained" model.
RANDOM_BASE_SEED = 1234


def load(base, adapter=None, quant: str | None = "nf4", dtype=None, *, tokenizer=None,
         seed: int = 0, block_size: int | None = None, double_quant: bool | None = None,
         remat: bool = False, tiny: dict | None = None, int4_symmetric: bool | None = None,
         progress: bool = False):
    """(model, tokenizer), ready to generate, score or train (the adapter stays trainable).

    The one loader of base + adapter + tokenizer: training, evaluation, generation, export,
    the lm-eval harness and the benches all come here.

    base: "smollm2" (the embedded SmolLM2-135M-Instruct), a Hugging Face directory, a
    `moka-convert` directory (keeps its own quantisation), or "random" (the tiny random
    LLaMA of models.presets.tiny; with an adapter trained on it, that adapter's one); or a
    config's `model` section (config.ModelConfig), which then gives the path, quant, dtype,
    tokenizer (unless one is passed), 4-bit layout, remat and tiny dimensions.
    adapter: a moka-jax adapter directory, an orbax adapter tree or a PEFT LoRA / DoRA
    directory; its base, targets and shapes are checked before the weights are read.
    quant: "nf4" | "int4" | "none", or None for the quantisation the adapter was trained on.
    dtype: compute dtype (default float32 on CPU, bfloat16 on accelerators).
    tokenizer: None (the base's own; the byte tokenizer for "random"), "bytes", "smollm2", a
    directory, or a loaded tokenizer (returned as is). None is returned when the base
    directory has no tokenizer files.
    block_size, double_quant, int4_symmetric: the 4-bit layout (default: the adapter's, else
    64, False and True).
    remat: rematerialise each decoder layer in the backward pass (training).
    tiny: the random model's dimensions (models.presets.TINY names; default: the adapter's).
    """
    from moka_jax.config import ModelConfig, resolve_path
    from moka_jax.config.checks import check_model_section
    from moka_jax.data.records import load_tokenizer
    from moka_jax.io import adapter_io, attach
    from moka_jax.models import presets
    from moka_jax.models.hf import default_dtype, load_hf, read_config
    from moka_jax.models.source import KEYWORDS, resolve

    if isinstance(base, ModelConfig):
        mc = base
        base = mc.path if mc.path in KEYWORDS else resolve_path(mc.path)
        quant, dtype, remat = mc.quant, jnp.dtype(mc.dtype), mc.remat
        block_size, double_quant = mc.block_size, mc.double_quant
        int4_symmetric = mc.int4_symmetric
        check_model_section(mc)
        tokenizer = mc.tokenizer if tokenizer is None else tokenizer
        tiny = dataclasses.asdict(mc.tiny)
    if quant not in (None, "none", *quant_lib.QUANT_KINDS):
        raise ValueError(f"quant={quant!r}; choose None (the adapter's), 'none' or one of "
                         f"{quant_lib.QUANT_KINDS}")
    dtype = dtype or default_dtype()
    source = resolve(base)
    config = read_config(source.path) if source.kind == "hf" else None
    meta = None if adapter is None else adapter_io.read_meta(adapter, config)
    trained = (meta or {}).get("base") or {}
    if tokenizer is None:  # loaded before the weights: a bad tokenizer fails fast
        tokenizer = "bytes" if source.kind == "random" else (
            str(source.path) if source.has_tokenizer else None)
    tokenizer_name = str(tokenizer) if isinstance(tokenizer, str | Path) else \
        type(tokenizer).__name__
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(str(tokenizer))
    q = quant or trained.get("quant") or "nf4"
    block_size = block_size or trained.get("block_size", 64)
    double_quant = trained.get("double_quant", False) if double_quant is None else double_quant
    symmetric = trained.get("int4_symmetric", True) if int4_symmetric is None else int4_symmetric
    if source.kind == "random":
        tiny = {**presets.TINY, **(tiny or trained.get("tiny") or {})}
        config = presets.tiny(**tiny)
    if tokenizer is not None and config is not None:  # both ways, before any weight
        check_tokenizer_vocab(config, len(tokenizer), tokenizer_name)
    if source.kind == "random":
        model = Llama(config, dtype=dtype, quant=q, block_size=block_size,
                      double_quant=double_quant, symmetric=symmetric, remat=remat,
                      rngs=nnx.Rngs(RANDOM_BASE_SEED))
    elif source.kind == "converted":
        from moka_jax.models.convert import load_converted
        model, _ = load_converted(source.path, remat=remat)
        if tokenizer is not None:
            check_tokenizer_vocab(model.config, len(tokenizer), tokenizer_name)
    else:
        if meta is not None:
            attach.check_adapter_base(meta, source.path, q)
            attach.precheck_adapter_shapes(config, meta, adapter)
        model, _ = load_hf(source.path, q, dtype=dtype, block_size=block_size,
                           double_quant=double_quant, symmetric=symmetric, remat=remat,
                           progress=progress)
    if adapter is not None:
        attach.attach_exported_adapter(model, adapter, seed=seed)
    # Static (hashable) model data: what save_adapter records as the adapter's base.
    model.moka_base = json.dumps({"path": "random" if source.path is None else str(source.path),
                                  "quant": q, "block_size": block_size,
                                  "double_quant": double_quant, "int4_symmetric": symmetric,
                                  "tiny": tiny if source.kind == "random" else None})
    return model, tokenizer


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
    every process) or "peft" (a PEFT directory, see moka_jax.io.peft_io)."""
    from moka_jax.io import adapter_io

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
    from moka_jax.io.export import merge_model
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
            nnx.state(layer.adapter, nn.AdapterParam)))
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
