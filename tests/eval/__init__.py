"""Shared helpers for the eval tests: a tiny random LLaMA and the byte tokenizer."""

import jax
import numpy as np
from flax import nnx

from moka_jax.config import BYTE_VOCAB_SIZE


def tiny_config(hidden: int = 32, layers: int = 2):
    from moka_jax.models.llama import LlamaConfig

    return LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, hidden_size=hidden, intermediate_size=64,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=hidden // 4, max_position_embeddings=4096, bos_token_id=1,
                       eos_token_ids=(2,), pad_token_id=0)


def tiny_model(seed: int = 0, **kw):
    from moka_jax.models.llama import Llama

    model = Llama(tiny_config(**kw), rngs=nnx.Rngs(seed))
    # Larger embeddings than the 0.02 init, so log-probs differ clearly between tokens.
    emb = model.embed.embedding
    emb.set_value(emb.get_value() * 25.0)
    return model


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)  # jitted whole: eager JAX would compile op by op


def ref_logprobs(model, seqs) -> list[np.ndarray]:
    """Per sequence, the (T, V) float64 log-softmax of its logits, in numpy.

    One plain forward (no cache) of the right-padded batch: causal attention keeps the pads
    out of every real position, and one call keeps the eager reference fast.
    """
    t = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), bool)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = s, True
    logits = np.asarray(_forward(model, ids, mask), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return [logp[r, :len(s)] for r, s in enumerate(seqs)]
