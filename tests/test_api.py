"""The one-call API: load, summary, save_adapter / load round trips, and the README's Python
example run as written."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moka_jax as mj
from moka_jax.config import REPO_ROOT
from moka_jax.nn import adapter_state, base_param_count


def test_summary_counts_per_kind_and_target(capsys):
    model, tok = mj.load("random", quant="nf4", dtype=jnp.float32)
    assert tok is not None and len(tok) == model.config.vocab_size  # the byte tokenizer
    mj.attach_adapters(model, mj.LoRAConfig(r=2), ["q_proj"], rngs=nnx.Rngs(0))
    mj.attach_adapters(model, mj.MoKAConfig(r=2), ["v_proj"], rngs=nnx.Rngs(0))
    s = mj.summary(model)
    layers = model.config.num_hidden_layers
    d = model.config.hidden_size
    lora = {"kind": "LoRA", "target": "q_proj", "layers": layers, "trainable": layers * 2 * (d + d)}
    assert s["rows"][0] == lora and s["rows"][1]["kind"] == "MoKA"
    assert s["rows"][1]["trainable"] == sum(
        int(np.prod(x.shape)) for i in range(layers)
        for x in jax.tree.leaves(nnx.state(model.layers[i].attn.v_proj.adapter)))
    assert s["trainable"] == mj.count_params(model) == sum(r["trainable"] for r in s["rows"])
    assert s["total"] == base_param_count(model) + s["trainable"]
    assert s["percent"] == pytest.approx(100 * s["trainable"] / s["total"])
    out = capsys.readouterr().out
    assert f"trainable params: {s['trainable']:,} || all params: {s['total']:,}" in out
    assert re.search(r"LoRA\s+q_proj\s+2\s+" + f"{lora['trainable']:,}", out)


def test_save_and_load_round_trip_keeps_base_settings(tmp_path):
    model, _ = mj.load("random", quant="int4", dtype=jnp.float32)
    mj.attach_adapters(model, mj.DoRAConfig(r=2), r"(q_proj|o_proj)$", rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                                   adapter_state(model)))
    out = mj.save_adapter(model, tmp_path / "a")
    back, _ = mj.load("random", adapter=out, quant=None, dtype=jnp.float32)  # int4, as trained
    ids = jnp.asarray(np.arange(12).reshape(2, 6), jnp.int32)
    fwd = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(fwd(back, ids)), np.asarray(fwd(model, ids)))
    merged = mj.merge(back)
    assert np.abs(np.asarray(fwd(merged, ids)) - np.asarray(fwd(model, ids))).max() <= 1e-4


def readme_example() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert "trainable params:" in out and re.search(r"loss \d", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "tiny-adapter", "tiny-adapter-orbax", "tiny-adapter-peft"]
