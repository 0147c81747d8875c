"""Perplexity of the responses of an Alpaca-format file: exp(mean NLL over response tokens)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from moka_jax.data import IGNORE, load_records, pad_id, require_tokenizer, tokenize
from moka_jax.data.batching import collate_rows, packed_plan, with_label_slots
from moka_jax.models.llama import check_positions, check_rows


@partial(jax.jit, static_argnames=("graphdef",))
def _nll_sums(graphdef, state, ids_BT, mask_BT, labels_BT):
    """(B,) summed NLL, (B,) token counts and (B,) count of labelled tokens that are the
    argmax of their prediction, over labelled positions (HF shift convention)."""
    model = nnx.merge(graphdef, state)
    logits_BTV = model(ids_BT, mask_BT)[:, :-1]
    logp_BTV = jax.nn.log_softmax(logits_BTV)
    tgt_BT = labels_BT[:, 1:]
    valid_BT = tgt_BT != IGNORE
    safe_BT = jnp.where(valid_BT, tgt_BT, 0)
    lp_BT = jnp.take_along_axis(logp_BTV, safe_BT[..., None], -1)[..., 0]
    top_BT = jnp.argmax(logits_BTV, -1) == safe_BT
    return (-jnp.sum(jnp.where(valid_BT, lp_BT, 0.0), -1), jnp.sum(valid_BT, -1),
            jnp.sum(valid_BT & top_BT, -1))


def response_scores(model, input_ids: list, labels: list, *, pad: int = 0, batch_size: int = 8,
                    multiple: int = 32, progress: str | None = None) -> dict[str, np.ndarray]:
    """Per example: "nll" (summed over its labelled tokens, float64), "tokens" (how many) and
    "greedy" (True when every labelled token is the argmax of its prediction given the tokens
    before it: greedy decoding from the prompt reproduces the labelled response exactly, ties
    aside). Right padding, lengths rounded up to `multiple` so few shapes compile."""
    check_rows(model.config, [*input_ids, [pad]], "response_scores",
               f"tokenize with cutoff_len <= {model.config.max_position_embeddings}")
    graphdef, state = nnx.split(model)
    order = np.argsort([len(x) for x in input_ids], kind="stable")
    nll = np.zeros(len(input_ids), np.float64)
    tokens = np.zeros(len(input_ids), np.int64)
    hits = np.zeros(len(input_ids), np.int64)
    for s in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None,
                  dynamic_ncols=True):
        idx = order[s:s + batch_size]
        t = -(-max(len(input_ids[i]) for i in idx) // multiple) * multiple
        ids = np.full((batch_size, t), pad, np.int32)
        mask = np.zeros((batch_size, t), bool)
        lab = np.full((batch_size, t), IGNORE, np.int32)  # filler rows count nothing
        for r, i in enumerate(idx):
            n = len(input_ids[i])
            ids[r, :n], mask[r, :n], lab[r, :n] = input_ids[i], True, labels[i]
        out = [np.asarray(x) for x in _nll_sums(graphdef, state, ids, mask, lab)]
        nll[idx], tokens[idx], hits[idx] = out[0][:len(idx)], out[1][:len(idx)], out[2][:len(idx)]
    return {"nll": nll, "tokens": tokens, "greedy": (hits == tokens) & (tokens > 0)}


TRACES = {"packed_scores": 0}  # how often _slot_scores was traced (= compiled) in this process


@partial(jax.jit, static_argnames=("graphdef",))
def _slot_scores(graphdef, state, ids_BT, segment_ids_BT, positions_BT, pos_BC, tgt_BC):
    """(B, C) NLL and (B, C) argmax hits at the label slots of packed rows: the head runs on
    the scored positions only, as the train step's loss does."""
    TRACES["packed_scores"] += 1  # runs at trace time only
    model = nnx.merge(graphdef, state)
    x_BTD, _ = model.hidden(ids_BT, segment_ids_BT=segment_ids_BT, positions_BT=positions_BT)
    logits_BCV = model.logits(jnp.take_along_axis(x_BTD, pos_BC[..., None], axis=1))
    valid_BC = tgt_BC != IGNORE
    safe_BC = jnp.where(valid_BC, tgt_BC, 0)
    lp_BC = jnp.take_along_axis(jax.nn.log_softmax(logits_BCV), safe_BC[..., None], -1)[..., 0]
    return jnp.where(valid_BC, -lp_BC, 0.0), valid_BC & (jnp.argmax(logits_BCV, -1) == safe_BC)


def packed_response_scores(model, data, *, row_len: int, rows: int = 4, pad: int = 0,
                           progress: str | None = None) -> dict[str, np.ndarray]:
    """response_scores of a TokenizedData, its examples packed first fit into `rows` rows of
    `row_len` tokens (segment ids keep each example's loss its own): one shape for the whole
    pass, so it compiles once, and a reused model state (same shapes) compiles never again."""
    # as response_scores: every id in the vocabulary, and a row (positions restart per
    # example, so the longest example bounds them) within the model's positions
    check_rows(model.config, data.input_ids, "packed_response_scores",
               f"shorten the examples to at most {model.config.max_position_embeddings} tokens")
    graphdef, state = nnx.split(model)
    plan, capacity = packed_plan(data, rows, row_len)
    nll = np.zeros(len(data), np.float64)
    tokens = np.zeros(len(data), np.int64)
    hits = np.zeros(len(data), np.int64)
    for members in tqdm(plan, desc=progress, disable=progress is None, dynamic_ncols=True):
        b = with_label_slots(collate_rows(data, members, row_len, pad), capacity)
        lp, hit = (np.asarray(x) for x in _slot_scores(
            graphdef, state, b["input_ids"], b["segment_ids"], b["positions"], b["loss_pos"],
            b["loss_tgt"]))
        # slot -> example: the segment id at the scored position names the row's member
        seg = np.take_along_axis(b["segment_ids"], b["loss_pos"], axis=1)
        for r, row in enumerate(members):
            for s, i in enumerate(row, 1):
                on = (seg[r] == s) & (b["loss_tgt"][r] != IGNORE)
                nll[i] += lp[r][on].sum(dtype=np.float64)
                tokens[i] += int(on.sum())
                hits[i] += int(hit[r][on].sum())
    return {"nll": nll, "tokens": tokens, "greedy": (hits == tokens) & (tokens > 0)}


def response_nll(model, input_ids: list, labels: list, *, pad: int = 0, batch_size: int = 8,
                 multiple: int = 32, progress: str | None = None) -> tuple[float, int]:
    """(total NLL, token count) of the labelled tokens; right padding, lengths rounded up."""
    s = response_scores(model, input_ids, labels, pad=pad, batch_size=batch_size,
                        multiple=multiple, progress=progress)
    return float(s["nll"].sum()), int(s["tokens"].sum())


def perplexity(model, tokenizer, path, *, template: str = "alpaca", cutoff_len: int = 512,
               limit: int | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """{"perplexity", "nll", "tokens", "examples"} of the responses (plus EOS) in `path`."""
    require_tokenizer(tokenizer, "perplexity")
    check_positions(cutoff_len, model.config, "perplexity: cutoff_len",
                    f"lower cutoff_len to at most {model.config.max_position_embeddings}")
    records, _ = load_records(path, "alpaca", limit)
    ids, labels = tokenize(records, tokenizer, template=template, cutoff_len=cutoff_len)
    nll, n = response_nll(model, ids, labels, pad=pad_id(tokenizer), batch_size=batch_size,
                          progress="perplexity" if progress else None)
    if n == 0:
        raise ValueError(f"{path}: no response token left within cutoff_len={cutoff_len}")
    return {"perplexity": float(np.exp(nll / n)), "nll": nll / n, "tokens": n,
            "examples": len(records), "file": str(path)}
