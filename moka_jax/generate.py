"""Batched text generation: left-padded prompts, KV cache, jit-compiled prefill and decode step.

    python -m moka_jax.generate --model smollm2 --prompt "What is the capital of France?"

--model: `smollm2` (embedded default), a Hugging Face directory, or a `moka_jax.convert` output.
Temperature 0 is greedy; > 0 samples with nucleus (top-p) filtering and --seed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def load_model(name_or_dir, quant: str = "nf4", dtype=None):
    """(model, config, directory with tokenizer files)."""
    from moka_jax.convert import is_converted, load_converted, resolve_source
    from moka_jax.models.hf import load_hf

    path = resolve_source(name_or_dir)
    if is_converted(path):
        model, config = load_converted(path)
    else:
        model, config = load_hf(path, quant, dtype=dtype)
    return model, config, path


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


def generate(model, input_ids_BT, attention_mask_BT=None, *, max_new_tokens: int = 64,
             eos_token_ids=(), pad_token_id: int = 0, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, prompt_multiple: int = 32,
             cache_multiple: int = 128) -> np.ndarray:
    """New tokens (B, <= max_new_tokens); after a row's eos the row holds pad_token_id.

    Prompts must be left-padded, so every row's last prompt token is at position T - 1.
    Prompt and cache lengths are rounded up (extra left padding is masked out exactly), so
    prompts of similar length reuse one compiled prefill and decode step.
    """
    ids_BT = np.asarray(input_ids_BT, np.int32)
    b, t = ids_BT.shape
    mask_BT = np.ones((b, t), bool) if attention_mask_BT is None else np.asarray(attention_mask_BT, bool)
    if not mask_BT[:, -1].all():
        raise ValueError("generate needs left-padded prompts (a real token last in every row)")
    extra = _round_up(t, prompt_multiple) - t
    ids_BT = np.pad(ids_BT, ((0, 0), (extra, 0)), constant_values=pad_token_id)
    mask_BT = np.pad(mask_BT, ((0, 0), (extra, 0)))
    t += extra
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


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompts(tokenizer, prompts, chat: bool = True):
    """Left-padded (ids_BT, mask_BT); the chat template is applied when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="np")
    else:
        enc = tokenizer(list(prompts), padding=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def eos_ids(config, tokenizer) -> tuple:
    ids = set(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def answer(model, config, tokenizer, prompts, *, chat: bool = True, **kw) -> list[str]:
    ids_BT, mask_BT = encode_prompts(tokenizer, prompts, chat)
    new_BN = generate(model, ids_BT, mask_BT, eos_token_ids=eos_ids(config, tokenizer),
                      pad_token_id=tokenizer.pad_token_id, **kw)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_BN]


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser(prog="python -m moka_jax.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 | HF directory | converted directory")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quant", default=None, choices=("nf4", "int4", "none"),
                    help="for HF directories (a converted directory keeps its own); default: "
                         "none on CPU (4-bit decode is weight-dequantisation bound there, about "
                         "10x slower per token), nf4 on accelerators")
    ap.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        quant = args.quant or ("none" if jax.default_backend() == "cpu" else "nf4")
        model, config, path = load_model(args.model, quant)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(path)
    t1 = time.perf_counter()
    answers = answer(model, config, tokenizer, args.prompt, chat=not args.no_chat,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_p=args.top_p, seed=args.seed)
    t2 = time.perf_counter()
    for prompt, text in zip(args.prompt, answers):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(text)
    print(f"[load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s, {Path(path).name}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
