"""4-bit frozen base weights: NF4 (bitsandbytes-compatible) and group-wise int4.

    q = quantize(w_OI, "nf4", block_size=64, double_quant=True, name="layers.0.q_proj")
    y = quant_matmul(x, q)          # == x @ dequantize(q).T, dequantised inside the jit
"""

from moka_jax.quant.nf4 import NF4_CODE
from moka_jax.quant.qweight import (
    QUANT_KINDS,
    QuantizedWeight,
    dequantize,
    quant_matmul,
    quantize,
)

__all__ = ["NF4_CODE", "QUANT_KINDS", "QuantizedWeight", "dequantize", "quant_matmul", "quantize"]
