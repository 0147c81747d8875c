"""Values are checked where they enter: one row per entry point (adapter load, merge, export,
the HF / converted base loads), each given a NaN, an inf or an overflow, each refused naming
the tensor, with nothing written."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moka_jax.adapters import LoRAConfig
from moka_jax.models.llama import Llama, LlamaConfig
from moka_jax.nn import adapter_state, attach_adapters
from moka_jax.support.finite import NonFiniteError, check_finite

TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=16)


def adapted(value=0.1):
    model = Llama(TINY, quant="none", rngs=nnx.Rngs(1))
    attach_adapters(model, LoRAConfig(r=2), r"q_proj$", rngs=nnx.Rngs(2))
    nnx.update(model, jax.tree.map(lambda x: jnp.full(x.shape, value, x.dtype),
                                   adapter_state(model)))
    return model


def poke_safetensors(file, name, value):
    """Overwrite the first value of tensor `name` in a safetensors file, in place."""
    from moka_jax.support.files import safetensors_header
    header, _, start = safetensors_header(file)
    e = header[name]
    with open(file, "r+b") as f:
        f.seek(start + e["data_offsets"][0])
        f.write(np.asarray([value], {"F32": np.float32, "F16": np.float16}[e["dtype"]])
                .tobytes())


def adapter_with(tmp, value):
    from moka_jax.io.adapter_format import write_adapter
    d = write_adapter(tmp / "adapter", {"layers/0/q": np.ones(4, np.float32)},
                      adapter_config={"kind": "lora"}, targets="q", base={})
    poke_safetensors(d / "adapter.safetensors", "layers/0/q", value)
    return d


def export_adapter(tmp, value, capsys):
    """moka-export --format orbax of an adapter holding `value`: exit 2, one line."""
    from moka_jax.cli import export
    assert export.main(["--adapter", str(adapter_with(tmp, value)), "--out",
                        str(tmp / "out"), "--format", "orbax"]) == 2
    return capsys.readouterr().err.strip().removeprefix("error: ")


def load_hf_base(tmp, value, capsys):
    from moka_jax.models.hf import load_hf, save_hf
    d = save_hf(Llama(TINY, quant="none", rngs=nnx.Rngs(0)), TINY, tmp / "hf")
    poke_safetensors(d / "model.safetensors", "model.layers.0.mlp.up_proj.weight", value)
    load_hf(d, "nf4", dtype=jnp.float32)


def load_converted_base(tmp, value, capsys):
    from moka_jax.models.convert import load_converted, save_converted
    model = Llama(TINY, quant="nf4", rngs=nnx.Rngs(0))
    norm = model.layers[0].attn_norm.weight
    norm.set_value(norm.get_value().at[3].set(value))
    load_converted(save_converted(model, TINY, tmp / "conv"))


def merge(tmp, value, capsys):
    from moka_jax.api import merge
    merge(adapted(value))


def export_hf(tmp, value, capsys):
    from moka_jax.io.export import export_hf
    model = adapted()
    w = model.layers[0].mlp.down_proj.kernel
    w.set_value(w.get_value().at[0, 0].set(value))
    export_hf(model, TINY, tmp / "hf_out")


# (entry point, the bad value, a regex the error must match, where nothing may be written)
CASES = [
    (export_adapter, np.nan, r"adapter .*adapter: tensor layers/0/q holds non-finite values "
                             r"\(1 NaN of 4\); train or export the adapter again", "out"),
    (export_adapter, -np.inf, r"tensor layers/0/q .*\(1 inf of 4\)", "out"),
    (load_hf_base, np.nan, r"model.safetensors: tensor model.layers.0.mlp.up_proj.weight holds "
                           r"non-finite values \(1 NaN of 8192\); re-download", None),
    (load_hf_base, np.inf, r"up_proj.weight holds non-finite values \(1 inf", None),
    (load_converted_base, np.nan, r"conv/state: layers/0/attn_norm/weight holds non-finite",
     None),
    (merge, 1e30, r"layers/0/attn/q_proj: the base weight with the adapter merged in holds "
                  r"non-finite values \(4096 inf of 4096\)", None),
    (merge, np.nan, r"q_proj: the base weight with the adapter merged in .*NaN", None),
    (export_hf, np.nan, r"model.layers.0.mlp.down_proj.weight \(weight\) holds non-finite "
                        r"values \(1 NaN of 8192\); nothing was written", "hf_out"),
]


@pytest.mark.parametrize("entry,value,want,out", CASES,
                         ids=[f"{c[0].__name__}-{c[1]}" for c in CASES])
def test_non_finite_values_are_refused_where_they_enter(tmp_path, capsys, entry, value, want,
                                                        out):
    """Each entry raises NonFiniteError, or (a command) returns the line it printed."""
    try:
        text = entry(tmp_path, value, capsys)
    except NonFiniteError as e:
        text = str(e)
    assert text and "\n" not in text
    assert __import__("re").search(want, text), text
    if out is not None:
        assert not (tmp_path / out).exists()


def test_finite_values_pass_unchanged_and_cheaply():
    import ml_dtypes
    for a in (np.full(8, 3e38, np.float32), np.ones(8, ml_dtypes.bfloat16),
              np.arange(8, dtype=np.uint8), jnp.ones(8)):
        assert check_finite(a, "x") is a
