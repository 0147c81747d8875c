"""Variable types: the trainable adapter tree is exactly `nnx.state(model, AdapterParam)`."""

from flax import nnx


class AdapterParam(nnx.LoRAParam):
    """Adapter factors, gates and magnitudes: the only thing the optimizer sees.

    A subclass of nnx.LoRAParam (itself an nnx.Param), so trainers that pick the trainable
    tree with `nnx.LoRAParam` (tunix's PEFT trainer) or `nnx.Param` find exactly the adapters.
    """


class FrozenWeight(nnx.Variable):
    """The frozen base (dense kernel or a QuantizedWeight pytree, biases, embeddings, norms).

    Deliberately not an nnx.Param: `nnx.Optimizer(..., wrt=AdapterParam)` and
    `nnx.state(model, AdapterParam)` never see it.
    """
