"""Adapter trees through orbax: plain orbax restores them (no moka_jax import), moka-jax loads them
back bit for bit, overwrite and strict-restore rules; the one reader's format errors. The
multi-process orbax write is covered by tests/train/test_train.py::test_two_processes_equal_one."""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moka_jax as mj
from moka_jax.io import adapter_io
from moka_jax.io.attach import attach_exported_adapter
from moka_jax.models.llama import Llama, LlamaConfig
from moka_jax.nn import adapter_state
from moka_jax.support.trees import CheckpointError

TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 128, (2, 7)), jnp.int32)


def trained(adapter=mj.MoKAConfig(r=3), targets=("q_proj", "v_proj")):
    model = Llama(TINY, quant="nf4", rngs=nnx.Rngs(1))
    mj.attach_adapters(model, adapter, list(targets), rngs=nnx.Rngs(2))
    rng = np.random.RandomState(0)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                                   adapter_state(model)))
    return model


PLAIN_ORBAX = textwrap.dedent("""
    import json, sys
    import numpy as np
    import orbax.checkpoint as ocp
    ckptr = ocp.StandardCheckpointer()
    tree = ckptr.restore(sys.argv[1])
    meta = ckptr.metadata(sys.argv[1]).custom_metadata
    flat = {}
    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, path + [k])
        else:
            flat["/".join(path)] = np.asarray(node).tolist()
    walk(tree, [])
    assert not any(m.startswith("moka_jax") for m in sys.modules), "moka_jax was imported"
    print(json.dumps({"meta": meta, "tree": flat}))
""")


def test_orbax_tree_restores_in_plain_orbax_and_loads_back(tmp_path):
    model = trained()
    out = mj.save_adapter(model, tmp_path / "tree", format="orbax")
    proc = subprocess.run([sys.executable, "-c", PLAIN_ORBAX, str(out)], capture_output=True,
                          text=True, timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    meta = got["meta"]
    assert meta["adapter"] == mj.adapter_config_to_dict(mj.MoKAConfig(r=3))
    assert meta["targets"] == ["q_proj", "v_proj"] and meta["base"]["quant"] == "nf4"
    ours = {"/".join(map(str, p)): np.asarray(v) for p, v in
            nnx.to_flat_state(adapter_state(model))}
    # Keyed by layer path: tree["layers"]["0"]["attn"]["q_proj"]["adapter"]["a"]["0"].
    assert sorted(got["tree"]) == sorted(ours)
    for k, v in ours.items():
        np.testing.assert_array_equal(np.asarray(got["tree"][k], v.dtype), v)

    back = Llama(TINY, quant="nf4", rngs=nnx.Rngs(1))
    assert attach_exported_adapter(back, out) == [f"layers/{i}/attn/{n}" for i in (0, 1)
                                                  for n in ("q_proj", "v_proj")]
    fwd = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(fwd(back, IDS)), np.asarray(fwd(model, IDS)))


def test_orbax_overwrite_rules_and_strict_restore(tmp_path):
    model = trained()
    out = mj.save_adapter(model, tmp_path / "tree", format="orbax")
    with pytest.raises(FileExistsError, match="overwrite"):
        mj.save_adapter(model, out, format="orbax")
    mj.save_adapter(trained(mj.LoRAConfig(r=2)), out, format="orbax", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"]  # the old one is gone
    other = Llama(TINY, quant="nf4", rngs=nnx.Rngs(1))
    mj.attach_adapters(other, mj.LoRAConfig(r=4), ["q_proj", "v_proj"], rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError, match=r"lora_a: checkpoint \[2, 64"):
        adapter_io.load_values(out, adapter_state(other))


def test_reader_names_what_it_expected(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        adapter_io.detect_format(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        adapter_io.detect_format(tmp_path / "empty")


def test_save_adapter_needs_one_attach_for_our_formats(tmp_path):
    model = trained()
    mj.attach_adapters(model, mj.LoRAConfig(r=2), ["k_proj"], rngs=nnx.Rngs(3))
    with pytest.raises(ValueError, match="2 attach_adapters calls"):
        mj.save_adapter(model, tmp_path / "x")
