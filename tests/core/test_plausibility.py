"""Allowed is not enough: adapters out of proportion to their layer are refused with the numbers
and the rule, and every public Kronecker function checks what its sibling checks. One row a
case, so a new case is one line."""

import jax.numpy as jnp
import pytest
from flax import nnx

from moka_jax.adapters import DoRAConfig, LoRAConfig, MoKAConfig, MoKAsConfig
from moka_jax.core import kron
from moka_jax.nn import Linear


def build(config, m: int, n: int):
    return config.build(Linear(n, m, rngs=nnx.Rngs(0)), "blk/q_proj", nnx.Rngs(0))


# (adapter config, layer (out, in), the message it must give)
ADAPTER_CASES = [
    (MoKAConfig(shapes=(((512, 512), (512, 512)),)), (64, 64),
     r"pads the 64x64 weight \(out x in\) to 262144x262144.*ma\*mb < 128 and na\*nb < 128"),
    (MoKAConfig(shapes=(((16, 8), (8, 8)),)), (64, 64),
     r"to 128x64, 2x or more of a dim.*mb = ceil\(64 / ma\)"),
    (MoKAConfig(shapes=(((8, 8), (8, 17)),)), (64, 64), r"to 64x136.*na\*nb < 128"),
    (MoKAConfig(shapes=(((8, 8), (8, 8)),) * 40), (64, 64),
     r"MoKA adapter has 5,160 trainable parameters, more than the 64x64 layer's own 4,096"),
    (MoKAConfig(r=40), (8, 8), r"MoKA adapter has .* more than the 8x8 layer's own 64.*adapter\.r"),
    (MoKAsConfig(primes=(61,)), (64, 61),   # one block as wide as the layer, plus a gate
     r"MoKAs adapter has 3,905 trainable parameters, more than the 64x61 layer's own 3,904"),
    (MoKAsConfig(primes=(37, 41, 43, 47)), (64, 64),    # 2 blocks of (32, p) each
     r"MoKAs adapter has 5,380 trainable parameters, more than the 64x64 layer's own 4,096"),
    (LoRAConfig(r=40), (64, 64),
     r"LoRA adapter has 5,120 trainable parameters, more than the 64x64 layer's own 4,096.*"
     r"lower adapter\.r to at most 32"),
    (DoRAConfig(r=32), (64, 64),
     r"DoRA adapter has 4,160 trainable parameters.*lower adapter\.r to at most 31"),
    (LoRAConfig(r=65), (64, 64), r"r=65 exceeds min\(out, in\) = 64"),
]


@pytest.mark.parametrize("config,dims,message", ADAPTER_CASES,
                         ids=[str(i) for i in range(len(ADAPTER_CASES))])
def test_implausible_adapters_are_refused_with_the_numbers(config, dims, message):
    with pytest.raises(ValueError, match=message) as e:
        build(config, *dims)
    assert "blk/q_proj" in str(e.value)


# At the limits: the largest adapters the rules allow are built.
ALLOWED = [
    (MoKAConfig(shapes=(((9, 8), (8, 8)),)), (65, 64)),     # 72 rows < 2 x 65
    (LoRAConfig(r=32), (64, 64)),                           # 32 * 128 = 4096 = the layer's
]


@pytest.mark.parametrize("config,dims", ALLOWED, ids=[str(i) for i in range(len(ALLOWED))])
def test_adapters_at_the_limits_are_built(config, dims):
    assert build(config, *dims) is not None


A, B = jnp.ones((4, 4)), jnp.ones((4, 4))  # covers (16, 16)
# (call of a public function, the error type, the message): materialise refuses what apply does
SIBLING_CASES = [
    (lambda: kron.kron_materialize(A, B, 32, 16), ValueError,
     r"kron_materialize: factors A \(4, 4\) and B \(4, 4\) give a \(16, 16\) product, which "
     r"does not cover the \(m, n\) = \(32, 16\)"),
    (lambda: kron.kron_apply(jnp.ones((2, 16)), A, B, 32, 16), ValueError,
     r"kron_apply: factors A \(4, 4\) and B \(4, 4\) give a \(16, 16\) product, which does "
     r"not cover the \(m, n\) = \(32, 16\)"),
    (lambda: kron.kron_materialize(A[None], B, 16, 16), ValueError,
     r"kron_materialize: a and b must be matrices"),
    (lambda: kron.kron_materialize(A, B, 0, 16), ValueError,
     r"kron_materialize: m \(out features\) = 0, expected >= 1"),
    (lambda: kron.kron_apply(jnp.ones((2, 16)), A, B, 16.0, 16), TypeError,
     r"kron_apply: m \(out features\) = 16.0 \(float\), expected int"),
    (lambda: kron.blockdiag_materialize(jnp.ones((1, 3)), 20, 8), ValueError,
     r"blockdiag_materialize: 3 blocks of c \(1, 3\) give 3 output rows, fewer than m = 20"),
    (lambda: kron.blockdiag_apply(jnp.ones((2, 8)), jnp.ones((1, 3)), 20, 8), ValueError,
     r"blockdiag_apply: 3 blocks of c \(1, 3\) give 3 output rows, fewer than m = 20"),
    (lambda: kron.blockdiag_materialize(jnp.ones(3), 2, 3), ValueError,
     r"blockdiag_materialize: c must be a \(q, p\) matrix"),
]


@pytest.mark.parametrize("call,error,message", SIBLING_CASES,
                         ids=[str(i) for i in range(len(SIBLING_CASES))])
def test_materialise_checks_what_apply_checks(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_materialise_expands_only_the_blocks_it_keeps():
    """A 1000 x 1000 A with a (2, 2) B for a (3, 3) weight: the slice, not a 2000^2 product."""
    a = jnp.arange(1e6, dtype=jnp.float32).reshape(1000, 1000)
    b = jnp.asarray([[1.0, 2.0], [3.0, 4.0]])
    assert jnp.array_equal(kron.kron_materialize(a, b, 3, 3), jnp.kron(a[:2, :2], b)[:3, :3])
