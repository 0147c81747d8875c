"""Perplexity of the responses of an Alpaca-format file: exp(mean NLL over response tokens)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from moka_jax.data import IGNORE, load_records, pad_id, tokenize


@partial(jax.jit, static_argnames=("graphdef",))
def _nll_sums(graphdef, state, ids_BT, mask_BT, labels_BT):
    """(B,) summed NLL and (B,) token counts over labelled positions (HF shift convention)."""
    model = nnx.merge(graphdef, state)
    logp_BTV = jax.nn.log_softmax(model(ids_BT, mask_BT)[:, :-1])
    tgt_BT = labels_BT[:, 1:]
    valid_BT = tgt_BT != IGNORE
    lp_BT = jnp.take_along_axis(logp_BTV, jnp.where(valid_BT, tgt_BT, 0)[..., None], -1)[..., 0]
    return -jnp.sum(jnp.where(valid_BT, lp_BT, 0.0), -1), jnp.sum(valid_BT, -1)


def response_nll(model, input_ids: list, labels: list, *, pad: int = 0, batch_size: int = 8,
                 multiple: int = 32, progress: str | None = None) -> tuple[float, int]:
    """(total NLL, token count) of the labelled tokens; right padding, lengths rounded up."""
    graphdef, state = nnx.split(model)
    order = np.argsort([len(x) for x in input_ids], kind="stable")
    total, count = 0.0, 0
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
        nll, cnt = _nll_sums(graphdef, state, ids, mask, lab)
        total += float(np.sum(np.asarray(nll, np.float64)))
        count += int(np.sum(cnt))
    return total, count


def perplexity(model, tokenizer, path, *, template: str = "alpaca", cutoff_len: int = 512,
               limit: int | None = None, batch_size: int = 8, progress: bool = True) -> dict:
    """{"perplexity", "nll", "tokens", "examples"} of the responses (plus EOS) in `path`."""
    records, _ = load_records(path, "alpaca", limit)
    ids, labels = tokenize(records, tokenizer, template=template, cutoff_len=cutoff_len)
    nll, n = response_nll(model, ids, labels, pad=pad_id(tokenizer), batch_size=batch_size,
                          progress="perplexity" if progress else None)
    if n == 0:
        raise ValueError(f"{path}: no response token left within cutoff_len={cutoff_len}")
    return {"perplexity": float(np.exp(nll / n)), "nll": nll / n, "tokens": n,
            "examples": len(records), "file": str(path)}
