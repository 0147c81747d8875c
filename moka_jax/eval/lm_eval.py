"""moka-jax as an lm-evaluation-harness model (`pip install -e '.[eval]'`, lm-eval 0.4.13).

    moka-lm-eval --model moka_jax --model_args base=smollm2,adapter=runs/x/adapter,quant=nf4 \
        --tasks arc_easy --batch_size 8

lm-eval 0.4.13 finds models only in its own registry (it reads no entry points), so the
model is registered when this module is imported: `moka-lm-eval` (moka_jax.cli.lm_eval) is
lm-eval's own command line with it imported first, and in Python `import moka_jax.eval.lm_eval`
before `lm_eval.simple_evaluate(model="moka_jax", ...)`.
loglikelihood runs on the compiled choice scoring (moka_jax.eval.commonsense.
score_continuations: context once into the KV cache, every continuation of it in one batch),
generate_until on moka_jax.eval.generate. Tokenisation is ours: the context with the tokenizer's
special tokens, the continuation without, as in `moka-eval --mode choice`.
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

DTYPES = ("float32", "bfloat16")


def _flag(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("moka_jax", "moka-jax")
class MokaLM(LM):
    """model_args: base (smollm2 | HF dir | convert dir | random), adapter (moka-jax, orbax or
    PEFT dir), quant (nf4 | int4 | none; default: the adapter's, else nf4), dtype (float32 |
    bfloat16), tokenizer, max_length, greedy_check (compute is_greedy; default true)."""

    def __init__(self, base: str = "smollm2", adapter: str | None = None, quant: str | None = None,
                 dtype: str | None = None, tokenizer: str | None = None, batch_size=8,
                 max_length: int | None = None, greedy_check=True, max_batch_size=None,
                 device=None, seed: int = 0):
        super().__init__()
        import jax.numpy as jnp

        from moka_jax.api import load

        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}; choose one of {DTYPES}")
        if str(batch_size).startswith("auto"):
            batch_size = 8  # our shapes are bucketed; no memory probing
        self.batch_size = int(batch_size)
        self.model, self.tokenizer = load(base, adapter or None, quant=quant,
                                          dtype=None if dtype is None else getattr(jnp, dtype),
                                          tokenizer=tokenizer, seed=int(seed))
        from moka_jax.data.records import require_tokenizer
        require_tokenizer(self.tokenizer, f"lm-eval base {base!r}")
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        from moka_jax.models.llama import check_positions
        check_positions(self.max_length, self.model.config, "lm-eval max_length",
                        f"lower it to at most {self.model.config.max_position_embeddings}")
        self.greedy_check = _flag(greedy_check)
        from moka_jax.data.records import pad_id
        from moka_jax.eval.generate import eos_ids
        self.pad = pad_id(self.tokenizer)
        self.eos = eos_ids(self.model.config, self.tokenizer)
        self.prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.eos[0]

    # ---- scoring --------------------------------------------------------------------------

    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx = self.tokenizer(context)["input_ids"] if context else [self.prefix]
        cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return ctx, cont

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Summed log-probs (and is_greedy) of token pairs; continuations of one context are
        scored together, as the choice evaluation does."""
        from moka_jax.eval.commonsense import MAX_CANDIDATES, score_continuations

        groups: dict[tuple, list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise ValueError("lm-eval asked for the log-likelihood of an empty continuation")
            keep = self.max_length - len(cont)
            if keep < 1:
                raise ValueError(f"a continuation of {len(cont)} tokens does not fit "
                                 f"max_length={self.max_length}")
            groups.setdefault(tuple(ctx[-keep:]), []).append(i)
        contexts = [list(c) for c in groups]
        conts = [[pairs[i][1] for i in idx] for idx in groups.values()]
        # Multiple choice: padded to the choice evaluation's candidate count (same shapes).
        n = MAX_CANDIDATES if max(map(len, conts)) > 1 else 1
        scores = score_continuations(self.model, contexts, conts, pad_id=self.pad,
                                     batch_size=self.batch_size, min_candidates=n)
        out = [None] * len(pairs)
        for idx, s in zip(groups.values(), scores):
            for i, v in zip(idx, s):
                out[i] = float(v)
        greedy = self._greedy(pairs) if self.greedy_check else [False] * len(pairs)
        return list(zip(out, greedy))

    def _greedy(self, pairs) -> list[bool]:
        """Whether greedy decoding after each context yields exactly its continuation."""
        from moka_jax.eval.generate import generate, left_pad

        flags = [False] * len(pairs)
        order = np.argsort([len(c) for c, _ in pairs], kind="stable")
        for s in range(0, len(order), self.batch_size):
            idx = list(order[s:s + self.batch_size])
            ctxs = [pairs[i][0][-(self.max_length - len(pairs[i][1])):] for i in idx]
            n = max(len(pairs[i][1]) for i in idx)
            ids, mask = left_pad(ctxs, self.pad)
            new = generate(self.model, ids, mask, max_new_tokens=n, pad_token_id=self.pad)
            for r, i in enumerate(idx):
                cont = pairs[i][1]
                flags[i] = new.shape[1] >= len(cont) and list(new[r, :len(cont)]) == list(cont)
        return flags

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([self._encode(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for r in requests:
            tokens = self.tokenizer(r.args[0], add_special_tokens=False)["input_ids"]
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                tokens, self.prefix, self.max_length, context_len=1)]
            out.append(sum(s for s, _ in self._score_no_greedy(windows)))
        return out

    def _score_no_greedy(self, pairs):
        check, self.greedy_check = self.greedy_check, False
        try:
            return self._score(pairs)
        finally:
            self.greedy_check = check

    # ---- generation ------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        from moka_jax.eval.generate import generate, left_pad

        out = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for idx in by_kwargs.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", 256))
            temperature = float(kw.pop("temperature", 0.0) or 0.0)
            if not _flag(kw.pop("do_sample", False)):
                temperature = 0.0
            top_p = float(kw.pop("top_p", 1.0) or 1.0)
            if kw:
                raise ValueError(f"generate_until: unsupported generation options {sorted(kw)}")
            enc = [self.tokenizer(requests[i].args[0])["input_ids"] for i in idx]
            order = np.argsort([len(e) for e in enc], kind="stable")
            for s in range(0, len(order), self.batch_size):
                rows = [int(j) for j in order[s:s + self.batch_size]]
                ctxs = [enc[j][-(self.max_length - max_new):] for j in rows]
                ids, mask = left_pad(ctxs, self.pad)
                new = generate(self.model, ids, mask, max_new_tokens=max_new,
                               eos_token_ids=self.eos, pad_token_id=self.pad,
                               temperature=temperature, top_p=top_p)
                for r, j in enumerate(rows):
                    text = self.tokenizer.decode(new[r], skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    out[idx[j]] = text
        return out
