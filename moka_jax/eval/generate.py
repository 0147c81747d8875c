"""Batched text generation: left-padded prompts, KV cache, jit-compiled prefill and decode step.

    model, tok = moka_jax.load("smollm2", quant="none")
    answer(model, model.config, tok, ["What is the capital of France?"])

Temperature 0 is greedy; > 0 samples with nucleus (top-p) filtering and a seed. num_beams > 1
is beam search, step for step transformers' `generate(num_beams=N, do_sample=False)`.
The command line is `moka-generate` (moka_jax.cli.generate).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moka_jax.data.records import chat_prompts, encode_prompts, pad_id, require_tokenizer
from moka_jax.models.llama import check_positions, check_token_ids
from moka_jax.support.domains import COUNT, NON_NEGATIVE, TOP_P, check


def select_token(logits_BV, key, temperature, top_p, greedy: bool):
    """Greedy argmax, or a sample from the top-p nucleus of softmax(logits / temperature)."""
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
    cutoff_B = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1)
    logits_BV = jnp.where(logits_BV >= cutoff_B[:, None], logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnames=("cache",))
def _forward_select(graphdef, state, ids_BT, mask_BT, cache, key, temperature, top_p, greedy):
    """One prefill (T = prompt length) or decode (T = 1) step, returning the next token."""
    model = nnx.merge(graphdef, state)
    logits_BTV, cache = model(ids_BT, mask_BT, cache=cache)
    return select_token(logits_BTV[:, -1], key, temperature, top_p, greedy), cache


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_decoding(max_new_tokens, num_beams, prompt_multiple, cache_multiple):
    for name, v in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams),
                    ("prompt_multiple", prompt_multiple), ("cache_multiple", cache_multiple)):
        check(f"generate: {name}", v, int, COUNT)


def _left_padded(model, input_ids_BT, attention_mask_BT, prompt_multiple: int,
                 max_new_tokens: int):
    """(ids_BT, mask_BT) in numpy, length rounded up to prompt_multiple by masked left pads;
    the real ids checked against the vocabulary, and the longest prompt plus
    max_new_tokens against the model's positions, before anything compiles."""
    ids_BT = np.asarray(input_ids_BT)
    if ids_BT.ndim != 2:
        raise ValueError(f"generate: input_ids must be (batch, length), got shape {ids_BT.shape}")
    config = model.config
    b, t = ids_BT.shape
    mask_BT = np.ones((b, t), bool) if attention_mask_BT is None else np.asarray(attention_mask_BT, bool)
    if mask_BT.shape != (b, t):
        raise ValueError(f"generate: attention_mask has shape {mask_BT.shape}, input_ids {(b, t)}")
    # The real tokens are checked; masked slots are fed as id 0, so a pad id the vocabulary
    # lacks (-1, or >= vocab_size, whose NaN embedding would reach the row through 0 * NaN in
    # attention) cannot matter.
    ids_BT = np.where(mask_BT, ids_BT, 0)
    check_token_ids(ids_BT, config.vocab_size, "generate: input_ids")
    ids_BT = ids_BT.astype(np.int32)
    if not mask_BT[:, -1].all():
        raise ValueError("generate needs left-padded prompts (a real token last in every row)")
    prompt = int(mask_BT.sum(1).max())
    room = config.max_position_embeddings - prompt
    check_positions(prompt + max_new_tokens, config, "generate",
                    f"the longest prompt has {prompt} tokens and max_new_tokens is "
                    f"{max_new_tokens}: " + (f"lower max_new_tokens to at most {room}" if room > 0
                                             else "shorten the prompt, it fills them alone"))
    extra = _round_up(t, prompt_multiple) - t
    return np.pad(ids_BT, ((0, 0), (extra, 0))), np.pad(mask_BT, ((0, 0), (extra, 0)))


def generate(model, input_ids_BT, attention_mask_BT=None, *, max_new_tokens: int = 64,
             eos_token_ids=(), pad_token_id: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, prompt_multiple: int = 32,
             cache_multiple: int = 128) -> np.ndarray:
    """New tokens (B, <= max_new_tokens); after a row's eos the row holds pad_token_id.

    Prompts must be left-padded, so every row's last prompt token is at position T - 1.
    Prompt and cache lengths are rounded up (extra left padding is masked out exactly), so
    prompts of similar length reuse one compiled prefill and decode step.
    num_beams > 1 is `beam_search` (deterministic; length_penalty and early_stopping as in HF).
    """
    _check_decoding(max_new_tokens, num_beams, prompt_multiple, cache_multiple)
    check("generate: temperature", temperature, float, NON_NEGATIVE)
    check("generate: top_p", top_p, float, TOP_P)
    check("generate: seed", seed, int, NON_NEGATIVE)
    if num_beams > 1:
        if temperature > 0:
            raise ValueError("beam search here is deterministic: use temperature 0 with "
                             "num_beams > 1")
        return beam_search(model, input_ids_BT, attention_mask_BT, num_beams=num_beams,
                           max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids,
                           pad_token_id=pad_token_id, length_penalty=length_penalty,
                           early_stopping=early_stopping, prompt_multiple=prompt_multiple,
                           cache_multiple=cache_multiple)
    ids_BT, mask_BT = _left_padded(model, input_ids_BT, attention_mask_BT, prompt_multiple,
                                   max_new_tokens)
    b, t = ids_BT.shape
    graphdef, state = nnx.split(model)
    greedy = temperature <= 0
    step = partial(_forward_select, graphdef, state, temperature=jnp.float32(max(temperature, 1e-6)),
                   top_p=jnp.float32(top_p), greedy=greedy)
    key = jax.random.key(seed)
    cache = model.init_cache(b, _round_up(t + max_new_tokens, cache_multiple))
    key, sub = jax.random.split(key)
    tok_B, cache = step(ids_BT, mask_BT, cache, sub)
    eos = np.asarray(list(eos_token_ids), np.int32)
    done_B, out = np.zeros(b, bool), []
    ones_B1 = np.ones((b, 1), bool)
    for i in range(max_new_tokens):
        tok = np.where(done_B, pad_token_id, np.asarray(tok_B))
        out.append(tok)
        done_B |= np.isin(tok, eos)
        if done_B.all() or i == max_new_tokens - 1:
            break
        key, sub = jax.random.split(key)
        tok_B, cache = step(tok[:, None], ones_B1, cache, sub)
    return np.stack(out, axis=1)


# ----------------------------------------------------------------------------- beam search
# transformers' GenerationMixin._beam_search (do_sample=False) step for step: the same top-K
# candidates, running beams, finished hypotheses, float32 scores with -1e9 masks, and stopping
# rule. The model steps run jitted on fixed shapes (B * N rows); the (B, K) bookkeeping is numpy.

NEG = np.float32(-1e9)  # HF's mask offset for "not selectable", added in float32


def beam_candidates(logits_RV, scores_BN, k: int):
    """Top-k (score, beam, token) per batch row over beams x vocab of running score + log p.

    Rows R = B * N are batch-major (row b * N + j is beam j of prompt b), as HF flattens them.
    """
    b, n = scores_BN.shape
    logp_BNV = jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1).reshape(b, n, -1)
    score_BK, flat_BK = jax.lax.top_k((logp_BNV + scores_BN[..., None]).reshape(b, -1), k)
    vocab = logits_RV.shape[-1]
    return score_BK, flat_BK // vocab, flat_BK % vocab


@partial(jax.jit, static_argnames=("graphdef", "num_beams", "k", "cache_len"))
def _beam_prefill(graphdef, state, ids_BT, mask_BT, *, num_beams, k, cache_len):
    """Prompts run once, their cache tiled to B * N rows, and the first top-k candidates.

    Beams 1.. start at -1e9 (HF's init), so the first candidates all come from beam 0.
    """
    model = nnx.merge(graphdef, state)
    b = ids_BT.shape[0]
    logits_BTV, cache = model(ids_BT, mask_BT, cache=model.init_cache(b, cache_len))
    cache = jax.tree.map(lambda x: jnp.repeat(x, num_beams, axis=0) if x.ndim else x, cache)
    scores_BN = jnp.broadcast_to(jnp.where(jnp.arange(num_beams) == 0, 0.0, NEG), (b, num_beams))
    logits_RV = jnp.repeat(logits_BTV[:, -1], num_beams, axis=0)
    return beam_candidates(logits_RV, scores_BN, k), cache


@partial(jax.jit, static_argnames=("graphdef", "k"), donate_argnames=("cache",))
def _beam_decode(graphdef, state, tok_R, parent_R, scores_BN, cache, *, k):
    """Cache rows reordered to each running beam's parent, one decode step, top-k candidates."""
    model = nnx.merge(graphdef, state)
    cache = jax.tree.map(lambda x: jnp.take(x, parent_R, axis=0) if x.ndim else x, cache)
    logits_R1V, cache = model(tok_R[:, None], jnp.ones((tok_R.shape[0], 1), bool), cache=cache)
    return beam_candidates(logits_R1V[:, 0], scores_BN, k), cache


def _top_n(x_BK, n: int):
    """Indices of the n largest per row, descending, ties to the lower index (as lax.top_k)."""
    return np.argsort(-x_BK, axis=-1, kind="stable")[:, :n]


def _take(x_BK, idx_BN):
    return np.take_along_axis(x_BK, idx_BN.reshape(idx_BN.shape + (1,) * (x_BK.ndim - 2)), axis=1)


def _masked(x_BK, *masks):
    """x + -1e9 for each mask that holds, added one by one in float32 as HF does."""
    for m in masks:
        x_BK = x_BK + np.where(m, NEG, np.float32(0))
    return x_BK


def _update_finished(fin, cand_BKM, score_BK, just_BK, gen_len: int, accept_B, length_penalty):
    """HF _update_finished_beams: the N best of the kept finished hypotheses and the candidates
    that just ended among the top N, each scored sum log p / gen_len ** length_penalty, where
    gen_len counts the new tokens, the eos included (prompt padding does not count)."""
    tok_BNM, score_BN, done_BN, len_BN = fin
    new_BK = score_BK / np.float32(gen_len ** length_penalty)
    new_BK = _masked(new_BK, ~accept_B[:, None], ~just_BK)
    merged = (np.concatenate([tok_BNM, cand_BKM], 1), np.concatenate([score_BN, new_BK], 1),
              np.concatenate([done_BN, just_BK], 1),
              np.concatenate([len_BN, np.full_like(just_BK, gen_len, np.int32)], 1))
    best_BN = _top_n(merged[1], score_BN.shape[1])
    return tuple(_take(x, best_BN) for x in merged)


def _improvable(best_running_B, fin_score_BN, fin_done_BN, length: int, length_penalty):
    """HF _check_early_stop_heuristic: can the best running beam, scored at `length`, still beat
    the worst finished hypothesis (always, while fewer than N have finished)?"""
    best_B = best_running_B / np.float32(length ** length_penalty)
    worst_BN = np.where(fin_done_BN, fin_score_BN.min(1, keepdims=True), NEG)
    return (best_B[:, None] > worst_BN).any(1)


def beam_search(model, input_ids_BT, attention_mask_BT=None, *, num_beams: int = 4,
                max_new_tokens: int = 64, eos_token_ids=(), pad_token_id: int = 0,
                length_penalty: float = 1.0, early_stopping: bool | str = False,
                prompt_multiple: int = 32, cache_multiple: int = 128) -> np.ndarray:
    """Best beam's new tokens (B, <= max_new_tokens), as transformers' generate(num_beams=N,
    do_sample=False): after eos (kept) a row holds pad_token_id, and the width is the longest
    best hypothesis. (HF pads with eos_token_ids[0] instead when pad_token_id is 0.)

    Per step: top K = max(2, 1 + #eos) * N of running score + log p over beams x vocab; the best
    N of them not ending (eos, or the last step) run on; those ending within the top N become
    finished hypotheses, and the N best finished are kept. A prompt is done once no running beam
    can beat its worst finished one (early_stopping=False: scored at the current length).
    """
    _check_decoding(max_new_tokens, num_beams, prompt_multiple, cache_multiple)
    ids_BT, mask_BT = _left_padded(model, input_ids_BT, attention_mask_BT, prompt_multiple,
                                   max_new_tokens)
    (b, t), n, m = ids_BT.shape, num_beams, max_new_tokens
    eos = np.asarray(list(eos_token_ids), np.int32)
    k = max(2, 1 + len(eos)) * n
    graphdef, state = nnx.split(model)
    cands, cache = _beam_prefill(graphdef, state, ids_BT, mask_BT, num_beams=n, k=k,
                                 cache_len=_round_up(t + m, cache_multiple))
    run_BNM = np.full((b, n, m), pad_token_id, np.int32)
    fin = (run_BNM, np.full((b, n), NEG), np.zeros((b, n), bool), np.zeros((b, n), np.int32))
    open_B = np.ones(b, bool)  # HF's is_early_stop_heuristic_unsatisfied
    for i in range(m):
        score_BK, beam_BK, tok_BK = (np.asarray(x) for x in cands)
        cand_BKM = _take(run_BNM, beam_BK)
        cand_BKM[:, :, i] = tok_BK
        ends_BK = np.isin(tok_BK, eos) | (i == m - 1)
        # The best N candidates that do not end run on.
        live_BK = _masked(score_BK, ends_BK)
        keep_BN = _top_n(live_BK, n)
        run_BNM, run_score_BN = _take(cand_BKM, keep_BN), _take(live_BK, keep_BN)
        parent_BN = _take(beam_BK, keep_BN) + np.arange(b)[:, None] * n
        # Those ending among the top N are hypotheses (not once a prompt is done).
        accept_B = open_B & ~(fin[2].all(1) & (early_stopping is True))
        just_BK = ends_BK & (np.arange(k) < n)
        fin = _update_finished(fin, cand_BKM, score_BK, just_BK, i + 1, accept_B, length_penalty)
        best_len = m if early_stopping == "never" and length_penalty > 0 else i + 1
        open_B &= _improvable(run_score_BN[:, 0], fin[1], fin[2], best_len, length_penalty)
        if not open_B.any() or (early_stopping is True and fin[2].all()) or ends_BK.all():
            break
        cands, cache = _beam_decode(graphdef, state, run_BNM[:, :, i].reshape(-1),
                                    parent_BN.reshape(-1).astype(np.int32), run_score_BN, cache,
                                    k=k)
    tok_BNM, _, _, len_BN = fin
    return tok_BNM[:, 0, :len_BN[:, 0].max()]


def prompt_batch(tokenizer, prompts, *, chat: bool = True):
    """Left-padded (ids_BT, mask_BT) of user prompts, through the chat template when `chat`
    and the tokenizer has one; the tokens are data.encode_prompts', as training masks them."""
    require_tokenizer(tokenizer, "prompt_batch")
    chat = chat and bool(getattr(tokenizer, "chat_template", None))
    texts = chat_prompts(tokenizer, list(prompts)) if chat else list(prompts)
    return left_pad(encode_prompts(tokenizer, texts, "chat" if chat else "alpaca"),
                    pad_id(tokenizer))


def left_pad(rows, pad: int):
    """Token rows of different lengths as left-padded (ids_BT, mask_BT), for generate."""
    t = max(map(len, rows))
    ids_BT = np.full((len(rows), t), pad, np.int32)
    mask_BT = np.zeros((len(rows), t), bool)
    for r, row in enumerate(rows):
        ids_BT[r, t - len(row):], mask_BT[r, t - len(row):] = row, True
    return ids_BT, mask_BT


def eos_ids(config, tokenizer) -> tuple:
    ids = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def answer(model, config, tokenizer, prompts, *, chat: bool = True, **kw) -> list[str]:
    ids_BT, mask_BT = prompt_batch(tokenizer, prompts, chat=chat)
    new_BN = generate(model, ids_BT, mask_BT, eos_token_ids=eos_ids(config, tokenizer),
                      pad_token_id=pad_id(tokenizer), **kw)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_BN]
