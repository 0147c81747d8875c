"""The NNX decoder family against transformers (f32, tiny random configs of every supported
architecture): logits, padding, KV cache, greedy generation, sliding windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moka_jax.adapters import MoKAConfig
from moka_jax.models.hf import load_hf
from moka_jax.models.llama import Llama, LlamaConfig, rope_inv_freq
from moka_jax.nn import DEFAULT_TARGETS, attach_adapters
from moka_jax.variables import AdapterParam

from tests.models.conftest import (TINY, hf_config, hf_logits, save_tiny,
                                   tiny_hf_model, torch)

TOL = 1e-4
REL_TOL = 1e-5  # max |ours - transformers| / max |transformers| (measured 0.8e-6 to 1.5e-6)
# Greedy decoding per architecture: a window on every layer, on some layers, and q/k norms.
GREEDY = ("mistral", "qwen2-window", "qwen3")


@pytest.fixture(autouse=True)
def small_attention_blocks(monkeypatch):
    """These parity tests use sequences of 12-40 tokens: query blocks of 5 make every one of
    them run the blocked causal attention (several blocks and an uneven last one), which at
    the default 64 only sequences longer than 64 reach. (Here only: the real-model tests
    would compile hundreds of blocks.)"""
    from moka_jax.models import llama

    monkeypatch.setattr(llama, "ATTENTION_BLOCK", 5)


@nnx.jit
def forward(model, ids_BT, mask_BT=None):
    # One compile per shape instead of op-by-op dispatch: keeps the suite fast on CPU.
    return model(ids_BT, mask_BT)


def run(model, ids, mask=None):
    return np.asarray(forward(model, jnp.asarray(ids), None if mask is None else jnp.asarray(mask)))


def random_ids(shape, vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def left_padded_mask(b, t, pads):
    mask = np.ones((b, t), np.int32)
    for row, p in enumerate(pads):
        mask[row, :p] = 0
    return mask


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    name, path, hf = tiny_dir
    model, config = load_hf(path, "none", dtype=jnp.float32)
    return name, hf, model, config


def test_logits_match_transformers(tiny):
    name, hf, model, config = tiny
    ids = random_ids((3, 12), config.vocab_size)
    ref = hf_logits(hf, ids)
    diff = np.abs(run(model, ids, np.ones_like(ids)) - ref).max() / np.abs(ref).max()
    assert diff <= REL_TOL, f"{name}: max relative diff {diff:.2e}"
    assert np.abs(ref).max() > 1.0  # logits not trivially small


def test_left_padding_matches_transformers_and_unpadded(tiny):
    name, hf, model, config = tiny
    ids = random_ids((3, 12), config.vocab_size, seed=1)
    mask = left_padded_mask(3, 12, pads=[0, 3, 7])
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    out = run(model, ids, mask)
    ref = hf_logits(hf, ids, mask, pos)
    valid = mask.astype(bool)
    diff = np.abs(out[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
    assert diff <= REL_TOL, f"{name}: padded max relative diff {diff:.2e}"
    alone = run(model, ids[2:3, 7:])[0]  # the most padded row, on its own
    assert np.abs(alone - out[2, 7:]).max() <= TOL


def test_right_padding_equals_unpadded(tmp_path):
    hf = tiny_hf_model("llama3")
    model, config = load_hf(save_tiny(hf, tmp_path / "hf"), "none", dtype=jnp.float32)
    ids = random_ids((2, 10), config.vocab_size, seed=2)
    mask = np.ones((2, 10), np.int32)
    mask[1, 6:] = 0
    out = run(model, ids, mask)
    alone = run(model, ids[1:, :6])[0]
    assert np.abs(out[1, :6] - alone).max() <= TOL


def test_kv_cache_incremental_equals_full_forward(tmp_path):
    chunks = (4, 4, 1, 1, 1)  # prefill, a chunked prefill, then single decode steps
    hf = tiny_hf_model("llama3", seed=3)
    model, config = load_hf(save_tiny(hf, tmp_path / "hf"), "none", dtype=jnp.float32)
    t = sum(chunks)
    ids = random_ids((2, t), config.vocab_size, seed=4)
    mask = left_padded_mask(2, t, pads=[0, 3])
    full = run(model, ids, mask)
    cache = model.init_cache(2, t + 2)
    step = nnx.jit(lambda m, i, k, c: m(i, k, cache=c))
    start, got = 0, []
    for n in chunks:
        logits, cache = step(model, jnp.asarray(ids[:, start:start + n]),
                             jnp.asarray(mask[:, start:start + n]), cache)
        got.append(np.asarray(logits))
        start += n
    got = np.concatenate(got, axis=1)
    valid = mask.astype(bool)
    assert np.abs(got[valid] - full[valid]).max() <= TOL
    assert int(cache.index) == t


def test_greedy_generation_equals_transformers(tiny):
    """Token for token (tolerance 0) through the KV cache (prefill, then one token a step),
    left-padded prompts longer than the tiny sliding windows, 10 new tokens."""
    from moka_jax.eval.generate import generate

    name, hf, model, config = tiny
    if name not in GREEDY:
        pytest.skip("LLaMA's greedy decoding: tests/models/test_smollm2.py and "
                    "tests/eval/test_generate.py; qwen2's biases: the logits rows")
    pad, eos = 7, (config.vocab_size - 1,)
    ids = random_ids((2, 9), config.vocab_size, seed=5)
    ids[1, :3] = pad
    mask = left_padded_mask(2, 9, pads=[0, 3])
    ours = generate(model, ids, mask, max_new_tokens=10, eos_token_ids=eos, pad_token_id=pad)
    with torch.no_grad():
        ref = hf.generate(torch.as_tensor(ids, dtype=torch.long),
                          attention_mask=torch.as_tensor(mask, dtype=torch.long),
                          max_new_tokens=10, do_sample=False, eos_token_id=list(eos),
                          pad_token_id=pad)[:, ids.shape[1]:].numpy()
    assert ours.tolist() == ref.tolist(), name


def test_sliding_window_mask_keeps_the_window_only():
    """A query sees itself and window - 1 slots back, as transformers' kv_idx > q_idx - window;
    a padded key stays hidden. (The parity rows with windows show it on whole models.)"""
    from moka_jax.models.llama import attention_mask

    slot = jnp.arange(6, dtype=jnp.int32)
    valid = jnp.asarray([[False, True, True, True, True, True]])
    mask = np.asarray(attention_mask(valid, slot, slot, window=3))[0]
    q, k = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    np.testing.assert_array_equal(mask, (k <= q) & (k > q - 3) & (k > 0))
    full = np.asarray(attention_mask(valid, slot, slot))[0]
    np.testing.assert_array_equal(full, (k <= q) & (k > 0))


@pytest.mark.parametrize("window", [None, 7])
def test_causal_attend_equals_full_attention_on_every_valid_query(window):
    """Blocked causal attention skips the tiles above the diagonal: the same outputs as the
    full attention for every query with a valid key, on packed rows (segments, padding) and
    on left-padded rows, T = 150 (blocks of 64 and an uneven last one), GQA 6 / 2 heads."""
    from moka_jax.models.llama import attend, attention_mask, causal_attend, segment_mask

    b, t, n, k, h = 3, 150, 6, 2, 16
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.standard_normal((b, t, m, h)), jnp.float32) for m in (n, k, k))
    seg = np.zeros((b, t), np.int32)
    seg[0, :70], seg[0, 70:140] = 1, 2          # two examples across a block edge, padding
    seg[1, :] = 1                               # one example, the whole row
    seg[2, :10], seg[2, 10:130] = 1, 2
    valid = np.ones((b, t), bool)
    valid[1, :20] = False                       # left padding
    slot = jnp.arange(t, dtype=jnp.int32)
    for mask in (segment_mask(jnp.asarray(seg), window),
                 attention_mask(jnp.asarray(valid), slot, slot, window)):
        full = np.asarray(attend(q, kk, v, mask))
        blocked = np.asarray(causal_attend(q, kk, v, mask, block=64))
        has_key = np.asarray(mask).any(-1)
        assert has_key.sum() > 0
        np.testing.assert_allclose(blocked[has_key], full[has_key], rtol=1e-5, atol=1e-6)


def test_remat_and_jit_give_the_same_logits(tmp_path):
    hf = tiny_hf_model("smollm2")
    path = save_tiny(hf, tmp_path / "hf")
    model, _ = load_hf(path, "none", dtype=jnp.float32)
    remat, _ = load_hf(path, "none", dtype=jnp.float32, remat=True)
    ids = jnp.asarray(random_ids((2, 9), 192))
    ref = run(model, ids)
    assert np.abs(run(remat, ids) - ref).max() <= 1e-5

    def loss(m):
        return jnp.mean(m(ids) ** 2)

    grad = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Variable)))
    g1, g2 = grad(model), grad(remat)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.allclose(a, b, atol=1e-5)


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = hf_config("llama3")
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(LlamaConfig.from_hf_dict(hf_cfg.to_dict()))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_config_round_trips_through_transformers():
    for name in TINY:
        ours = LlamaConfig.from_hf_dict(hf_config(name).to_dict())
        back = LlamaConfig.from_hf_dict(type(hf_config(name))(**ours.to_hf_dict()).to_dict())
        assert back == ours, name


def test_transformers_4_style_rope_scaling_is_read():
    d = dict(TINY["llama3"], rope_theta=500000.0, model_type="llama")
    d["rope_scaling"] = dict(d.pop("rope_parameters"), rope_type="llama3")
    del d["rope_scaling"]["rope_theta"]
    c = LlamaConfig.from_hf_dict(d)
    assert c.rope_type == "llama3" and c.rope_theta == 500000.0
    assert c.rope_llama3 == (8.0, 1.0, 4.0, 32)


def test_unsupported_rope_type_is_an_error():
    d = dict(TINY["llama2"], model_type="llama",
             rope_parameters={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        LlamaConfig.from_hf_dict(d)


def tiny_config(**kw):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return LlamaConfig(**{**base, **kw})


def test_default_adapters_hit_q_and_v_of_every_layer_and_start_at_zero():
    model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    ids = jnp.asarray(random_ids((2, 8), 128))
    before = run(model, ids)
    paths = attach_adapters(model, MoKAConfig(r=2), DEFAULT_TARGETS, rngs=nnx.Rngs(1))
    assert len(paths) == 2 * model.config.num_hidden_layers
    assert sorted(paths) == sorted(f"layers/{i}/attn/{p}" for i in range(3)
                                   for p in ("q_proj", "v_proj"))
    np.testing.assert_array_equal(run(model, ids), before)  # dW = 0 exactly at init


def test_regex_reaches_every_linear_without_surgery():
    model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    from moka_jax.nn import linear_paths

    names = {p.rsplit("/", 1)[-1] for p, _ in linear_paths(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "lm_head"}
    tied = Llama(tiny_config(tie_word_embeddings=True), rngs=nnx.Rngs(0))
    assert "lm_head" not in {p for p, _ in linear_paths(tied)}


def _nf4_moka_model(dtype, adapter=True):
    """The same nf4 weights and MoKA factors (same seeds) in either compute dtype."""
    model = Llama(tiny_config(), quant="nf4", dtype=dtype, rngs=nnx.Rngs(0))
    if adapter:
        attach_adapters(model, MoKAConfig(r=4), rngs=nnx.Rngs(1))
        rng = np.random.default_rng(0)
        for path, var in nnx.iter_graph(model):
            if isinstance(var, AdapterParam) and "a" not in path:  # B = 0 and g = 0 at init
                var.set_value(jnp.asarray(0.1 * rng.standard_normal(var.shape), jnp.float32))
    return model


def test_nf4_bf16_model_matches_its_f32_twin():
    # Tolerance: logits within 3e-2 of the f32 model's (relative Frobenius; measured 1.3e-2,
    # a few bf16 roundings through 3 layers), and the adapter adds at most half again to the
    # bf16 error the nf4 base has on its own (measured 1.4e-2 without the adapter).
    ids = jnp.asarray(random_ids((2, 16), 128))
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                             / np.linalg.norm(np.asarray(b, np.float64)))
    with jax.default_matmul_precision("highest"):
        f32, base_f32 = (forward(_nf4_moka_model(jnp.float32, a), ids) for a in (True, False))
    bf16, base_bf16 = (forward(_nf4_moka_model(jnp.bfloat16, a), ids) for a in (True, False))
    assert bf16.dtype == jnp.float32 and bf16.shape == (2, 16, 128)
    assert rel(f32, base_f32) > 0.1  # the adapter changes the logits: the check is not vacuous
    assert rel(bf16, f32) <= 3e-2, rel(bf16, f32)
    assert rel(bf16, f32) <= 1.5 * rel(base_bf16, base_f32), (rel(bf16, f32), rel(base_bf16, base_f32))


def test_select_token_greedy_and_nucleus():
    from moka_jax.eval.generate import select_token

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.key(0)
    assert (select_token(logits, keys, 1.0, 1.0, greedy=True) == 0).all()
    # top_p 0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8): the two renormalised to 5/8 and 3/8.
    picks = np.asarray(select_token(logits, keys, jnp.float32(1.0), jnp.float32(0.7), greedy=False))
    assert set(np.unique(picks)) == {0, 1}
    assert abs(np.mean(picks == 0) - 0.625) < 0.03
    # A tiny top_p still keeps the most likely token.
    picks = select_token(logits, keys, jnp.float32(1.0), jnp.float32(1e-6), greedy=False)
    assert (np.asarray(picks) == 0).all()


def test_generate_samples_reproducibly_and_stops_at_eos():
    from moka_jax.eval.generate import generate

    model = Llama(tiny_config(), rngs=nnx.Rngs(0))
    ids = random_ids((2, 5), 128)
    mask = left_padded_mask(2, 5, pads=[0, 2])
    a = generate(model, ids, mask, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=1)
    b = generate(model, ids, mask, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=1)
    np.testing.assert_array_equal(a, b)
    greedy = generate(model, ids, mask, max_new_tokens=6)
    eos = int(greedy[0, 2])  # pretend the third greedy token of row 0 is the eos
    stopped = generate(model, ids, mask, max_new_tokens=6, eos_token_ids=(eos,), pad_token_id=-1)
    assert stopped[0, 2] == eos and (stopped[0, 3:] == -1).all()
    np.testing.assert_array_equal(stopped[0, :3], greedy[0, :3])
