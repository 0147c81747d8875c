"""Linear = frozen base (dense or 4-bit) + optional adapter; attaching adapters by regex or names."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moka_jax import quant
from moka_jax.adapters import MoKAConfig
from moka_jax.support.hostmem import host_cast, to_device
from moka_jax.variables import AdapterParam, FrozenWeight

# The paper's placement: q_proj and v_proj in every layer.
DEFAULT_TARGETS = r"(q_proj|v_proj)$"


class Linear(nnx.Module):
    """y = base(x) (+ adapter). The base is frozen: a dense (in, out) kernel or a QuantizedWeight.

    quant: "none" | "nf4" | "int4". dtype: compute dtype (None follows x).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = False,
                 quant: str = "none", block_size: int = 64, double_quant: bool = False,
                 symmetric: bool = True, dtype=None, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None, name: str = "", weight=None, bias=None):
        self.in_features, self.out_features = in_features, out_features
        self.dtype, self.name = dtype, name
        if weight is None:
            if rngs is None:
                raise ValueError(f"layer '{name}': pass rngs (random init) or weight (out, in)")
            init = jax.nn.initializers.lecun_normal()
            weight = init(rngs.params(), (in_features, out_features), param_dtype).T
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"layer '{name}': weight shape {tuple(weight.shape)} != "
                             f"(out, in) = ({out_features}, {in_features})")
        if quant == "none" and isinstance(weight, np.ndarray):
            # a host weight (a checkpoint's lm_head): cast and transpose in one host copy, then
            # placed without another (jnp.asarray(w).T would hold 3 more copies at its peak)
            self.kernel = FrozenWeight(to_device(host_cast(
                weight, jax.dtypes.canonicalize_dtype(param_dtype or weight.dtype), transpose=True)))
        elif quant == "none":
            self.kernel = FrozenWeight(jnp.asarray(weight, param_dtype).T)  # (in, out)
        else:
            self.kernel = FrozenWeight(_quantize(
                weight, quant, block_size=block_size, double_quant=double_quant,
                symmetric=symmetric, name=name))
        self.quant = quant
        if use_bias:
            b = jnp.zeros((out_features,), param_dtype) if bias is None else jnp.asarray(bias)
            self.bias = FrozenWeight(b)
        else:
            self.bias = None
        # nnx.data: the slot is a pytree child even while empty, so an adapter can be attached later.
        self.adapter = nnx.data(None)

    @classmethod
    def from_weight(cls, weight, bias=None, **kw):
        """A frozen linear from a (out, in) weight (PyTorch / Hugging Face layout)."""
        out_features, in_features = weight.shape
        return cls(in_features, out_features, use_bias=bias is not None, weight=weight,
                   bias=bias, **kw)

    def weight(self, dtype=jnp.float32):
        """The (dequantised) base weight, (out, in)."""
        k = self.kernel.get_value()
        if isinstance(k, quant.QuantizedWeight):
            return quant.dequantize(k, dtype)
        return k.T.astype(dtype)

    def base(self, x):
        """Base matmul without bias, in the compute dtype."""
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        k = self.kernel.get_value()
        if isinstance(k, quant.QuantizedWeight):
            return quant.quant_matmul(x, k, dtype)
        return x @ k.astype(dtype)

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        x = x.astype(dtype)
        y = self.base(x)
        if self.adapter is not None:
            y = self.adapter(x, y, self)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(y.dtype)
        return y

    def merged_weight(self, dtype=jnp.float32):
        """W0 (dequantised) with the adapter folded in, (out, in)."""
        w0 = self.weight(jnp.float32)
        return (w0 if self.adapter is None else self.adapter.merge(w0)).astype(dtype)


def _quantize(weight, kind, **kw):
    if kind not in quant.QUANT_KINDS:
        raise ValueError(f"layer '{kw.get('name', '')}': unknown quant {kind!r}; "
                         f"choose 'none' or one of {quant.QUANT_KINDS}")
    return quant.quantize(np.asarray(weight) if not isinstance(weight, jax.Array) else weight,
                          kind, **kw)


class MoKADense(Linear):
    """A Flax NNX dense layer = frozen kernel (dense or 4-bit) + the gated Kronecker update.

        layer = MoKADense(4096, 4096, moka=MoKAConfig(r=10), quant="nf4", rngs=nnx.Rngs(0))
    """

    def __init__(self, in_features: int, out_features: int, *, moka=None,
                 rngs: nnx.Rngs, **kw):
        super().__init__(in_features, out_features, rngs=rngs, **kw)
        self.adapter = (moka or MoKAConfig()).build(self, self.name, rngs)


def linear_paths(model) -> list[tuple[str, Linear]]:
    """('a/b/c', module) for every Linear inside model, in graph order."""
    return [("/".join(map(str, path)), node) for path, node in nnx.iter_graph(model)
            if isinstance(node, Linear)]


def target_matcher(targets):
    """A predicate on layer paths: a regex (re.search) or a list of module names.

    A name matches the path's last component (`q_proj`), as PEFT's `target_modules` list does;
    a name with slashes (`attn/q_proj`) matches the path's trailing components.
    """
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ValueError(f"target regex {targets!r} is invalid: {e}") from None
        return lambda path: pattern.search(path) is not None
    if not isinstance(targets, list | tuple) or not targets or \
            not all(isinstance(t, str) and t.strip("/") for t in targets):
        raise ValueError(f"targets {targets!r}: give a regex string or a non-empty list of "
                         "module names such as ['q_proj', 'v_proj']")
    dotted = [t for t in targets if "." in t]
    if dotted:
        raise ValueError(f"targets {dotted}: module names here are path components; write "
                         f"{[t.rsplit('.', 1)[-1] for t in dotted]} (the last name), or "
                         "'attn/q_proj' for several")
    names = tuple(t.strip("/") for t in targets)
    return lambda path: any(path == n or path.endswith("/" + n) for n in names)


def _describe(targets) -> str:
    return f"target regex {targets!r}" if isinstance(targets, str) else f"targets {list(targets)}"


def _nnx_linears(model) -> list[tuple[tuple, nnx.Linear]]:
    return [(path, node) for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Linear) and path]


def _frozen_from_nnx(layer: nnx.Linear, name: str) -> Linear:
    """Our Linear holding the nnx.Linear's kernel and bias as FrozenWeight (same math)."""
    if layer.precision is not None or layer.dot_general is not jax.lax.dot_general \
            or layer.preferred_element_type is not None:
        raise ValueError(f"layer '{name}': an nnx.Linear with a custom precision, dot_general "
                         "or preferred_element_type cannot be adapted (the frozen copy would "
                         "compute differently)")
    kernel = layer.kernel.get_value()  # (in, out)
    bias = None if layer.bias is None else layer.bias.get_value()
    return Linear(layer.in_features, layer.out_features, use_bias=bias is not None,
                  weight=kernel.T, bias=bias, dtype=layer.dtype, param_dtype=kernel.dtype,
                  name=name)


def _child(parent, key):
    return parent[key] if isinstance(key, int) or isinstance(parent, dict) else getattr(parent, key)


def _set_child(parent, key, value):
    if isinstance(key, int) or isinstance(parent, dict):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _freeze_nnx_linears(model, match) -> None:
    """Replace every matching plain nnx.Linear by a frozen Linear (kernel no longer a Param)."""
    for path, layer in _nnx_linears(model):
        name = "/".join(map(str, path))
        if match(name):
            parent = model
            for key in path[:-1]:
                parent = _child(parent, key)
            _set_child(parent, path[-1], _frozen_from_nnx(layer, name))


def module_names(model) -> list[str]:
    """The distinct last path components of the linear layers (the Hugging Face names)."""
    paths = [p for p, _ in linear_paths(model)]
    paths += ["/".join(map(str, p)) for p, _ in _nnx_linears(model)]
    return sorted({p.rsplit("/", 1)[-1] for p in paths})


def attach_adapters(model, config, targets=DEFAULT_TARGETS, *, rngs: nnx.Rngs,
                    replace: bool = False):
    """Attach config.build(...) to every linear layer whose path matches `targets`.

    targets: a regex searched in each path (`layers/0/attn/q_proj`) or, as PEFT's
    target_modules, a list of module names matched on the last component (['q_proj', 'v_proj']).
    Plain flax.nnx.Linear layers of any NNX model are adapted too: each matching one becomes a
    moka_jax Linear with the same kernel and bias, frozen (FrozenWeight, not an nnx.Param).
    Returns the matched paths. Targets that match nothing are an error, never a no-op; so is a
    layer that already has an adapter, unless replace=True.
    """
    if not hasattr(config, "build"):
        raise TypeError(f"config = {config!r}: expected an adapter config (MoKAConfig, "
                        "MoKAsConfig, LoRAConfig, DoRAConfig)")
    if not isinstance(targets, str | list | tuple):
        raise TypeError(f"targets = {targets!r} ({type(targets).__name__}): expected a regex "
                        "string or a list of module names")
    match = target_matcher(targets)
    if not linear_paths(model) and not _nnx_linears(model):
        raise ValueError(f"{_describe(targets)}: the model has no Linear or nnx.Linear layers")
    _freeze_nnx_linears(model, match)
    layers = linear_paths(model)
    matched = [(p, m) for p, m in layers if match(p)]
    if not matched:
        sample = ", ".join(p for p, _ in layers[:8])
        raise ValueError(f"{_describe(targets)} matches no Linear layer; paths look like: "
                         f"{sample}; the module names are {module_names(model)}")
    taken = [p for p, m in matched if m.adapter is not None]
    if taken and not replace:
        raise ValueError(f"{len(taken)} matched layer(s) already have an adapter ({taken[:3]}"
                         f"{' ...' if len(taken) > 3 else ''}); pass replace=True to replace them")
    for path, layer in matched:
        layer.adapter = config.build(layer, path, rngs)
    # Recorded on the model so save_adapter / summary know what was attached (static data).
    spec = (config, targets if isinstance(targets, str) else tuple(targets))
    model.moka_adapters = tuple(getattr(model, "moka_adapters", ())) + (spec,)
    return [p for p, _ in matched]


def adapter_state(model):
    """The trainable tree: exactly the AdapterParam variables."""
    return nnx.state(model, AdapterParam)


def count_params(model, var_type=AdapterParam) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, var_type)))


def base_param_count(model) -> int:
    """Parameters of the frozen base, counting a 4-bit weight by its original (out, in) shape."""
    total = 0
    for _, node in nnx.iter_graph(model):
        if isinstance(node, FrozenWeight):
            v = node.get_value()
            if isinstance(v, quant.QuantizedWeight):
                total += int(np.prod(v.shape))
            elif v is not None:
                total += sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
    return total
