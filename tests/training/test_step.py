"""The train step's loss: labelled-only logits equal full logits; packed rows equal padded rows.

Tiny random LLaMA, f32, a MoKA adapter with non-zero B (so gradients reach every factor).
Tolerances: labelled-only vs full logits <= 1e-6 relative (same math, fewer rows); packed vs
padded <= 1e-5 relative (attention over a different number of masked slots reorders sums).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moka_jax import data as D
from moka_jax.adapters import MoKAConfig
from moka_jax.data.batching import collate_rows, label_slots, pack_rows
from moka_jax.models.llama import Llama, LlamaConfig
from moka_jax.nn import attach_adapters
from moka_jax.training.step import labelled_loss_sums, split_model, step_inputs, token_loss_sums
from moka_jax.variables import AdapterParam

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model():
    m = Llama(CFG, quant="nf4", block_size=16, rngs=nnx.Rngs(0))
    attach_adapters(m, MoKAConfig(r=2), rngs=nnx.Rngs(1))
    # Non-zero B so dW != 0 and every factor has a gradient.
    state = nnx.state(m, AdapterParam)
    leaves = jax.tree.leaves(state)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(m, jax.tree.unflatten(jax.tree.structure(state), [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]))
    return m


def examples(n=7, seed=0):
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(n):
        L = int(rng.integers(5, 20))
        x = rng.integers(3, CFG.vocab_size, L).astype(np.int32)
        lab = x.copy()
        lab[: int(rng.integers(1, L - 1))] = D.IGNORE        # a prompt, then the response
        ids.append(x)
        labels.append(lab)
    return D.TokenizedData(ids, labels, np.zeros(n, np.int64), ["f"])


def loss_and_grads(model, fn):
    graphdef, params, frozen = split_model(model)

    def loss(p):
        s, n = fn(nnx.merge(graphdef, p, frozen))
        return s / n, (s, n)

    (_, (s, n)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return float(s), int(n), g


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def assert_same(ref, got, tol):
    (s0, n0, g0), (s1, n1, g1) = ref, got
    assert n0 == n1
    assert abs(s1 - s0) <= tol * abs(s0)
    worst = max(jax.tree.leaves(jax.tree.map(rel, g1, g0)))
    assert worst <= tol, worst


def padded(data):
    batch = collate_rows(data, [[i] for i in range(len(data))], 32)
    batch["loss_pos"], batch["loss_tgt"] = label_slots(batch, 32)
    return batch


def test_labelled_only_logits_equal_full_logits(model):
    batch = padded(examples())
    full = loss_and_grads(model, lambda m: token_loss_sums(
        m(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])),
        jnp.asarray(batch["labels"])))
    inputs = {k: jnp.asarray(v) for k, v in step_inputs(batch).items()}
    labelled = loss_and_grads(model, lambda m: labelled_loss_sums(m, inputs))
    assert_same(full, labelled, 1e-6)


def test_packed_rows_equal_the_unpacked_padded_batch(model):
    data = examples(9, seed=1)
    ref_batch = {k: jnp.asarray(v) for k, v in step_inputs(padded(data)).items()}
    ref = loss_and_grads(model, lambda m: labelled_loss_sums(m, ref_batch))
    rows = pack_rows(range(len(data)), data.lengths, 48, 4)
    assert len(rows) == 1 and max(len(r) for r in rows[0]) >= 2   # really packed
    batch = collate_rows(data, rows[0], 48)
    batch["loss_pos"], batch["loss_tgt"] = label_slots(batch, 64)
    packed = loss_and_grads(model, lambda m: labelled_loss_sums(
        m, {k: jnp.asarray(v) for k, v in step_inputs(batch).items()}))
    assert_same(ref, packed, 1e-5)


def test_no_token_attends_across_a_segment_boundary(model):
    data = examples(2, seed=2)
    batch = collate_rows(data, [[0, 1]], 48)
    n0 = len(data.input_ids[0])
    changed = {k: v.copy() for k, v in batch.items()}
    changed["input_ids"][0, :n0] = (changed["input_ids"][0, :n0] + 1) % CFG.vocab_size

    def hidden(b):
        return np.asarray(model.hidden(jnp.asarray(b["input_ids"]),
                                       segment_ids_BT=jnp.asarray(b["segment_ids"]),
                                       positions_BT=jnp.asarray(b["positions"]))[0])

    h, h2 = hidden(batch), hidden(changed)
    n1 = len(data.input_ids[1])
    assert np.array_equal(h[0, n0:n0 + n1], h2[0, n0:n0 + n1])   # second example untouched
    assert not np.allclose(h[0, :n0], h2[0, :n0])
    alone = collate_rows(data, [[1]], 48)                        # and equal to it alone
    np.testing.assert_allclose(hidden(alone)[0, :n1], h[0, n0:n0 + n1], rtol=1e-5, atol=1e-5)
