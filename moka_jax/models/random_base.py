"""A random 4-bit LLaMA made on the device, one weight at a time: no full-precision copy of
the model ever exists, so a 7B base fits an accelerator whose host could not hold it in f32.
Benches time steps on it (bench/gpu_bench.py); its weights mean nothing.

    model = random_nf4_base(presets.llama2_7b(), jnp.bfloat16)   # laid out as load_hf's
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from moka_jax import nn, quant
from moka_jax.models.llama import Llama, LlamaConfig
from moka_jax.quant.nf4 import quantize_nf4_on_device
from moka_jax.variables import FrozenWeight


@partial(jax.jit, static_argnums=(1, 2, 3))
def _random_nf4_leaves(key, n_out: int, n_in: int, block_size: int):
    w_OI = jax.nn.initializers.lecun_normal()(key, (n_in, n_out), jnp.float32).T  # as Linear
    return quantize_nf4_on_device(w_OI, block_size)


def random_nf4(key, n_out: int, n_in: int, block_size: int) -> quant.QuantizedWeight:
    """A lecun-normal (out, in) weight drawn and nf4-quantised on the default device."""
    packed, absmax = _random_nf4_leaves(key, n_out, n_in, block_size)
    return quant.QuantizedWeight(packed, absmax, kind="nf4", shape=(n_out, n_in),
                                 block_size=block_size, orig_dtype="float32")


def _random_dense(key, path: str, shape, dtype):
    if path.endswith("kernel"):  # lm_head (in, out)
        return jax.nn.initializers.lecun_normal()(key, shape, dtype)
    if path.endswith("embedding"):
        return 0.02 * jax.random.normal(key, shape, dtype)
    return jnp.ones(shape, dtype)  # norm scales


def random_nf4_base(config: LlamaConfig, dtype, *, block_size: int = 64, remat: bool = False,
                    seed: int = 0) -> Llama:
    """The frozen model as load_hf lays it out (nf4 linears, dense lm_head / embeddings /
    norms): an abstract skeleton, then each weight drawn (and quantised) on the device."""
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, param_dtype=dtype, quant="none",
                                         remat=remat, rngs=nnx.Rngs(0)))
    key = jax.random.key(seed)
    layers = [(p, layer) for p, layer in nn.linear_paths(model) if p != "lm_head"]
    for i, (_, layer) in enumerate(tqdm(layers, desc="nf4 weights", leave=False)):
        layer.kernel = FrozenWeight(random_nf4(jax.random.fold_in(key, i), layer.out_features,
                                               layer.in_features, block_size))
        layer.quant = "nf4"
    dense = [("/".join(map(str, p)), v) for p, v in nnx.iter_graph(model)
             if isinstance(v, FrozenWeight) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]
    for i, (path, var) in enumerate(dense, start=len(layers)):
        spec = var.get_value()
        var.set_value(_random_dense(jax.random.fold_in(key, i), path, spec.shape, spec.dtype))
    return model


__all__ = ["random_nf4", "random_nf4_base"]
