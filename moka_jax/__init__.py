"""moka-jax: Mixture of Kronecker Adapters for 4-bit LLaMA-family models in JAX / Flax NNX.

    import moka_jax as mj
    cfg = mj.load_config("configs/tiny-debug.yaml", ["train.steps=20"])
    summary = mj.train(cfg)                                  # plan, then the training loop
    model, tok = mj.load("random", adapter=summary["adapter_dir"])
    mj.summary(model)

The names below are imported when first used (module __getattr__), so `import moka_jax` does
not import JAX: a tool that only reads a config or a report starts light.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "AdapterParam": "moka_jax.variables",
    "FrozenWeight": "moka_jax.variables",
    "DoRAConfig": "moka_jax.adapters",
    "LoRAConfig": "moka_jax.adapters",
    "MoKAConfig": "moka_jax.adapters",
    "MoKAsConfig": "moka_jax.adapters",
    "adapter_config_from_dict": "moka_jax.adapters",
    "adapter_config_to_dict": "moka_jax.adapters",
    "kron_apply": "moka_jax.core.kron",
    "kron_materialize": "moka_jax.core.kron",
    "plan_moka_shapes": "moka_jax.core.shapes",
    "plan_mokas_primes": "moka_jax.core.shapes",
    "QuantizedWeight": "moka_jax.quant",
    "dequantize": "moka_jax.quant",
    "quantize": "moka_jax.quant",
    "DEFAULT_TARGETS": "moka_jax.nn",
    "Linear": "moka_jax.nn",
    "MoKADense": "moka_jax.nn",
    "adapter_state": "moka_jax.nn",
    "attach_adapters": "moka_jax.nn",
    "count_params": "moka_jax.nn",
    "Config": "moka_jax.config",
    "load_config": "moka_jax.config",
    "load": "moka_jax.api",
    "merge": "moka_jax.api",
    "save_adapter": "moka_jax.api",
    "summary": "moka_jax.api",
    "train": "moka_jax.training.run",
    "kron_svd_fit": "moka_jax.adapters.fit",
    "lora_svd_fit": "moka_jax.adapters.fit",
    "moka_from_delta": "moka_jax.adapters.fit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moka_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})
