"""PEFT directories both ways, checked in peft itself on tiny random f32 models: LoRA / DoRA /
multi-component MoKA out (PeftModel logits == ours on the dequantised base), PEFT LoRA / DoRA /
rsLoRA / LoKr in (our logits == PeftModel's, and the imported adapter trains), and the refusals."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import moka_jax as mj
from moka_jax.io import peft_io
from moka_jax.adapters import DoRAConfig, LoRAConfig, MoKAConfig, MoKAsConfig
from moka_jax.io.export import export_hf
from moka_jax.models.llama import Llama, LlamaConfig
from moka_jax.nn import adapter_state, attach_adapters, linear_paths
from tests.models.conftest import hf_config, load_transformers

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REL_TOL = 1e-4  # max |ours - peft| / max |ours|
# GQA: q_proj is 64 x 64, v_proj 32 x 64, so multi-shape LoKr groups are exercised.
TINY = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)
IDS = np.random.RandomState(0).randint(0, TINY.vocab_size, (2, 9)).astype(np.int32)


def randomize(model, seed=0):
    rng = np.random.RandomState(seed)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                                   adapter_state(model)))
    return model


def adapted(adapter, quant="nf4", targets=("q_proj", "v_proj"), config=TINY):
    model = Llama(config, quant=quant, rngs=nnx.Rngs(1))
    attach_adapters(model, adapter, list(targets), rngs=nnx.Rngs(2))
    return randomize(model)


def ours(model, ids=IDS):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))


def hf_model(path):
    return load_transformers(path)  # the class config.json names (LLaMA, Qwen2, ...)


def torch_logits(model, ids=IDS):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def family_config(name: str) -> LlamaConfig:
    """The tiny config of another architecture (tests/models/conftest.py's table)."""
    return LlamaConfig.from_hf_dict(hf_config(name).to_dict())


def with_random_biases(model, seed=3):
    """Non-zero q/k/v biases (Qwen2), so the base's bias path is part of the parity."""
    rng = np.random.RandomState(seed)
    for _, layer in linear_paths(model):
        if layer.bias is not None:
            layer.bias.set_value(jnp.asarray(rng.normal(0, 0.5, layer.bias.shape), jnp.float32))
    return model


@pytest.mark.parametrize("adapter, config", [
    (LoRAConfig(r=4, alpha=8), TINY), (DoRAConfig(r=4, alpha=6), TINY),
    *((LoRAConfig(r=4, alpha=8), family_config(f)) for f in ("qwen2", "qwen3"))],
    ids=["lora", "dora", "lora-qwen2", "lora-qwen3"])  # Mistral has LLaMA's module names
def test_lora_dora_export_loads_in_peft_with_equal_logits(adapter, config, tmp_path):
    model = with_random_biases(adapted(adapter, config=config))
    base = export_hf(model, config, tmp_path / "base", merged=False)  # the dequantised nf4 base
    assert type(hf_model(base)).__name__ == config.architecture
    out = mj.save_adapter(model, tmp_path / "peft", format="peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == adapter.alpha
    assert cfg["use_dora"] == isinstance(adapter, DoRAConfig)
    assert cfg["target_modules"] == ["q_proj", "v_proj"]
    theirs = torch_logits(peft.PeftModel.from_pretrained(hf_model(base), str(out)).eval())
    assert rel(theirs, ours(model)) <= REL_TOL, rel(theirs, ours(model))
    assert rel(torch_logits(hf_model(base)), ours(model)) > 1e-2  # the adapter matters


# One key / value head: v_proj is 16 x 64, and component 1's shapes on q_proj and v_proj need
# different decompose_factors, so it becomes one LoKr adapter per layer shape.
KV1 = dataclasses.replace(TINY, num_key_value_heads=1)


@pytest.mark.parametrize("adapter, config, names", [
    (MoKAConfig(r=3, exact=True), KV1, ["moka_0", "moka_1_64x64", "moka_1_16x64", "moka_2"]),
    (MoKAConfig(r=2, gated=False, exact=True), TINY, ["moka_0", "moka_1"]),
    (MoKAsConfig(primes=(2,)), TINY, ["moka_0"])], ids=["gated", "ungated", "mokas"])
def test_moka_exports_as_lokr_adapters_peft_sums(adapter, config, names, tmp_path):
    model = adapted(adapter, config=config)
    base = export_hf(model, config, tmp_path / "base", merged=False)
    out = peft_io.export_peft(model, tmp_path / "lokr", str(base))
    assert [a.name for a in peft_io.peft_adapters(model)] == names
    peft_model = peft_io.load_peft_model(hf_model(base), out)
    assert sorted(peft_model.base_model.active_adapters) == sorted(
        ["default", *names[1:]])
    theirs = torch_logits(peft_model)
    assert rel(theirs, ours(model)) <= REL_TOL, rel(theirs, ours(model))


def test_default_planner_shapes_peft_cannot_build_are_refused(tmp_path):
    # The default planner gives q_proj (64 x 64) a non-square A; PEFT builds w1 square there.
    model = adapted(MoKAConfig(r=3))
    with pytest.raises(peft_io.PeftError, match=r"layer 'layers/0/attn/q_proj'.*adapter.exact"):
        peft_io.export_peft(model, tmp_path / "x")
    padded = adapted(MoKAConfig(shapes=(((8, 8), (9, 8)),)), targets=["q_proj"])
    with pytest.raises(peft_io.PeftError, match=r"layer 'layers/0/attn/q_proj'.*pads"):
        peft_io.export_peft(padded, tmp_path / "x")
    mokas = adapted(MoKAsConfig(primes=(5,)), targets=["q_proj"])
    with pytest.raises(peft_io.PeftError, match=r"layer 'layers/0/attn/q_proj'.*MoKAs"):
        peft_io.export_peft(mokas, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ---- import -----------------------------------------------------------------------------

def peft_made(tmp_path, peft_config, perturb):
    """(base dir, PEFT dir, PeftModel logits) of an adapter made by peft itself on q_proj,
    v_proj and down_proj, its weights perturbed in place by perturb(name, param)."""
    base = export_hf(Llama(TINY, quant="none", rngs=nnx.Rngs(1)), TINY, tmp_path / "base",
                     merged=False)
    torch.manual_seed(0)
    model = peft.get_peft_model(hf_model(base), peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            perturb(name, p)
    model.save_pretrained(tmp_path / "peft")
    return base, tmp_path / "peft", torch_logits(model.eval())


PEFT_TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_dir(tmp_path, **lora):
    """A PEFT LoRA directory with random (non-zero) B."""
    return peft_made(tmp_path, peft.LoraConfig(target_modules=PEFT_TARGETS, **lora),
                     lambda n, p: ("lora_B" in n or "magnitude" in n)
                     and p.add_(0.1 * torch.randn_like(p)))


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8, use_dora=True),
                                  dict(r=4, lora_alpha=8, use_rslora=True)],
                         ids=["lora", "dora", "rslora"])
def test_peft_lora_imports_with_equal_logits_and_trains(lora, tmp_path):
    base, src, theirs = peft_dir(tmp_path, **lora)
    model, tok = mj.load(base, adapter=src, quant="none", dtype=jnp.float32)
    assert tok is None  # the exported tiny base has no tokenizer files
    assert rel(ours(model), theirs) <= REL_TOL, rel(ours(model), theirs)
    counts = mj.summary(model, print_fn=None)
    want = sum(p.numel() for n, p in peft.PeftModel.from_pretrained(hf_model(base), str(src))
               .named_parameters() if "lora_" in n)
    assert counts["trainable"] == want
    # Continue training: the imported factors get gradients and move.
    before = jax.tree.map(np.array, adapter_state(model))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=mj.AdapterParam)

    @nnx.jit
    def step(model, opt, ids):
        def loss_fn(m):
            logits = m(ids)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, mj.AdapterParam))(model)
        opt.update(model, grads)
        return loss

    step(model, opt, jnp.asarray(IDS))
    assert all(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(adapter_state(model))))


def test_round_trip_through_peft_is_exact(tmp_path):
    model = adapted(DoRAConfig(r=2), quant="none")
    out = mj.save_adapter(model, tmp_path / "peft", format="peft")
    back = Llama(TINY, quant="none", rngs=nnx.Rngs(1))
    from moka_jax.io.attach import attach_exported_adapter
    attach_exported_adapter(back, out)
    for a, b in zip(jax.tree.leaves(adapter_state(model)), jax.tree.leaves(adapter_state(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("change, message", [
    ({"bias": "all"}, "bias='all'"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
])
def test_peft_import_refuses_what_it_cannot_model(change, message, tmp_path):
    _, src, _ = peft_dir(tmp_path, r=2, lora_alpha=4)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(peft_io.PeftError, match=message):
        peft_io.read_peft(src, TINY)


def test_peft_import_refuses_unknown_modules(tmp_path):
    _, src, _ = peft_dir(tmp_path, r=2, lora_alpha=4)
    other = dataclasses.replace(TINY, num_hidden_layers=1)  # layer 1 does not exist there
    with pytest.raises(peft_io.PeftError, match="model.layers.1.*not a LoRA factor"):
        peft_io.read_peft(src, other)


def lokr_dir(tmp_path, **lokr):
    """A PEFT LoKr directory, every factor random (non-zero dW)."""
    return peft_made(tmp_path, peft.LoKrConfig(target_modules=PEFT_TARGETS, **lokr),
                     lambda n, p: "lokr_" in n and p.copy_(0.3 * torch.randn_like(p)))


@pytest.mark.parametrize("lokr", [dict(r=32, alpha=16), dict(r=2, alpha=3, decompose_both=True),
                                  dict(r=4, alpha=4, decompose_factor=4)],
                         ids=["whole", "low-rank", "factor-4"])
def test_peft_lokr_imports_as_ungated_moka_with_equal_logits(lokr, tmp_path):
    base, src, theirs = lokr_dir(tmp_path, **lokr)
    keys = set(__import__("safetensors.numpy", fromlist=["x"]).load_file(
        str(src / "adapter_model.safetensors")))
    assert any(k.endswith("lokr_w1_a") for k in keys) == bool(lokr.get("decompose_both"))
    model, _ = mj.load(base, adapter=src, quant="none", dtype=jnp.float32)
    assert rel(ours(model), theirs) <= REL_TOL, rel(ours(model), theirs)
    assert rel(torch_logits(hf_model(base)), theirs) > 1e-2  # the adapter matters
    meta, _ = peft_io.read_peft(src, TINY)
    assert meta["adapter"]["kind"] == "moka" and meta["adapter"]["gated"] is False
    assert {k for k, _ in meta["adapter"]["shapes"]} == {"64x64", "32x64", "64x128"}


@pytest.mark.parametrize("adapter, config", [(MoKAConfig(r=3, exact=True), KV1),
                                             (MoKAsConfig(primes=(2,)), TINY)],
                         ids=["gated-multi-shape", "mokas"])
def test_moka_round_trips_through_peft_lokr(adapter, config, tmp_path):
    model = adapted(adapter, quant="none", config=config)
    out = peft_io.export_peft(model, tmp_path / "lokr")
    back = Llama(config, quant="none", rngs=nnx.Rngs(1))
    from moka_jax.io.attach import attach_exported_adapter
    attach_exported_adapter(back, out)
    assert rel(ours(back), ours(model)) <= 1e-5, rel(ours(back), ours(model))
    want = {p: l.adapter for p, l in linear_paths(model) if l.adapter is not None}
    got = {p: l.adapter for p, l in linear_paths(back) if l.adapter is not None}
    assert sorted(got) == sorted(want)
    for p in want:
        np.testing.assert_allclose(got[p].delta_weight(), want[p].delta_weight(),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("change, message", [
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"use_effective_conv2d": True, "module_dropout": 0.1, "init_weights": False}, None),
])
def test_peft_lokr_import_options(change, message, tmp_path):
    _, src, _ = lokr_dir(tmp_path, r=2, alpha=2)
    cfg = json.loads((src / "adapter_config.json").read_text())
    (src / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    if message is None:   # training-time or conv-only options: nothing refused
        peft_io.read_peft(src, TINY)
        return
    with pytest.raises(peft_io.PeftError, match=message):
        peft_io.read_peft(src, TINY)
