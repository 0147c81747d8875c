"""moka-jax: Mixture of Kronecker Adapters for 4-bit LLaMA-family models in JAX / Flax NNX."""

from moka_jax.adapters import (
    DoRAConfig,
    LoRAConfig,
    MoKAConfig,
    MoKAsConfig,
    adapter_config_from_dict,
    adapter_config_to_dict,
)
from moka_jax.api import load, merge, save_adapter, summary
from moka_jax.kron import kron_apply, kron_materialize
from moka_jax.nn import (
    DEFAULT_TARGETS,
    Linear,
    MoKADense,
    adapter_state,
    attach_adapters,
    count_params,
)
from moka_jax.quant import QuantizedWeight, dequantize, quantize
from moka_jax.shapes import plan_moka_shapes, plan_mokas_primes
from moka_jax.variables import AdapterParam, FrozenWeight

__all__ = [
    "AdapterParam", "DEFAULT_TARGETS", "DoRAConfig", "FrozenWeight", "Linear", "LoRAConfig",
    "MoKAConfig", "MoKADense", "MoKAsConfig", "QuantizedWeight", "adapter_config_from_dict",
    "adapter_config_to_dict", "adapter_state", "attach_adapters", "count_params", "dequantize",
    "kron_apply", "kron_materialize", "load", "merge", "plan_moka_shapes", "plan_mokas_primes",
    "quantize", "save_adapter", "summary",
]
