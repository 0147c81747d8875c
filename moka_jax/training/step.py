"""The jit-compiled train step: loss and gradients for the adapter tree only, AdamW update.

State is split once into (graphdef, adapter params, frozen rest); the step is a pure function
of (params, opt_state, frozen, batch) with params and opt_state donated, so the frozen base is
never copied, never differentiated and never updated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moka_jax.data.records import IGNORE
from moka_jax.variables import AdapterParam

# What the step reads of a host batch (batching.BatchIterator / batching.eval_batches).
STEP_KEYS = ("input_ids", "segment_ids", "positions", "loss_pos", "loss_tgt")


def step_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in STEP_KEYS}


def one_example_rows(ids, scored: int | None = None) -> dict:
    """A step batch of ids (..., B, T), one example a row and no padding, scoring the next token
    at the first `scored` positions (default all T - 1): for benches and synthetic checks."""
    t = ids.shape[-1]
    scored = t - 1 if scored is None else scored
    lead = ids.shape[:-1]
    return {"input_ids": ids, "segment_ids": jnp.ones_like(ids),
            "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), ids.shape),
            "loss_pos": jnp.broadcast_to(jnp.arange(scored, dtype=jnp.int32), (*lead, scored)),
            "loss_tgt": ids[..., 1:scored + 1]}


def token_loss_sums(logits_BTV, labels_BT):
    """(sum of next-token NLL over labelled positions, number of labelled positions), from full
    logits: the reference that `labelled_loss_sums` is tested against."""
    logits = logits_BTV[:, :-1].astype(jnp.float32)
    labels = labels_BT[:, 1:]
    valid = labels != IGNORE
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def labelled_loss_sums(model, batch):
    """token_loss_sums without the (B, T, V) logits: the head runs on the hidden states of the
    scored positions only (loss_pos / loss_tgt, (B, C), see batching.label_slots)."""
    x_BTD, _ = model.hidden(batch["input_ids"], segment_ids_BT=batch["segment_ids"],
                            positions_BT=batch["positions"])
    x_BCD = jnp.take_along_axis(x_BTD, batch["loss_pos"][..., None], axis=1)
    logits_BCV = model.logits(x_BCD)
    tgt_BC = batch["loss_tgt"]
    valid = tgt_BC != IGNORE
    nll = optax.softmax_cross_entropy_with_integer_labels(logits_BCV, jnp.where(valid, tgt_BC, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def split_model(model):
    """(graphdef, adapter params, frozen rest)."""
    return nnx.split(model, AdapterParam, ...)


class TrainStep:
    """Callable jitted step; `compilations` counts traces (one per sequence-length bucket).

    Gradient accumulation is the batch's leading axis (sharding.place_batch splits a batch
    into train.grad_accum micro-batches), so the step needs no count of its own."""

    def __init__(self, graphdef, tx: optax.GradientTransformation):
        self.graphdef, self.tx = graphdef, tx
        self.compilations = 0
        self._step = jax.jit(self._impl, donate_argnums=(0, 1))
        self._eval = jax.jit(self._eval_impl)

    def _loss_sums(self, params, frozen, batch):
        return labelled_loss_sums(nnx.merge(self.graphdef, params, frozen), batch)

    def _impl(self, params, opt_state, frozen, batch):
        self.compilations += 1  # runs at trace time only

        def micro(carry, mb):
            g_acc, loss_acc, n_acc = carry

            (s, n), g = jax.value_and_grad(
                lambda p: self._loss_sums(p, frozen, mb), has_aux=True)(params)
            return (jax.tree.map(jnp.add, g_acc, g), loss_acc + s, n_acc + n), None

        # batch arrives as micro-batches (accum, B / accum, T). Summing NLL and token counts
        # over them and dividing once makes accumulation exactly the full-batch mean.
        mbs = batch
        zeros = jax.tree.map(jnp.zeros_like, params)
        (g_sum, loss_sum, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0), mbs)
        n = jnp.maximum(n, 1)
        grads = jax.tree.map(lambda g: g / n, g_sum)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss_sum / n, "tokens": n, "grad_norm": optax.tree.norm(grads)}
        return params, opt_state, metrics

    def _eval_impl(self, params, frozen, batch):
        s, n = self._loss_sums(params, frozen, batch)
        return s, n

    def __call__(self, params, opt_state, frozen, batch):
        return self._step(params, opt_state, frozen, batch)

    def eval_sums(self, params, frozen, batch):
        return self._eval(params, frozen, batch)
