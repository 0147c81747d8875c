"""Variable types: the trainable adapter tree is exactly `nnx.state(model, AdapterParam)`."""

from flax import nnx


class AdapterParam(nnx.Param):
    """Adapter factors, gates and magnitudes: the only thing the optimizer sees."""


class FrozenWeight(nnx.Variable):
    """The frozen base (dense kernel or a QuantizedWeight pytree, biases, embeddings, norms).

    Deliberately not an nnx.Param: `nnx.Optimizer(..., wrt=AdapterParam)` and
    `nnx.state(model, AdapterParam)` never see it.
    """
