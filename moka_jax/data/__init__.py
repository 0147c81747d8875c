"""Training and evaluation data: records (templates, tokenizers, tokenisation, IGNORE), sources
(files and `datasets` in, checked and tokenised with a cache), batching (buckets, packing,
label slots, the resumable batch order).

    tok = load_tokenizer("smollm2")
    train, val = build_datasets(cfg.data, tok)      # TokenizedData: ids + labels per example
"""

from moka_jax.data.records import (ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, FIELDS, IGNORE,
                                   LLM_ADAPTERS_PROMPT_INPUT, LLM_ADAPTERS_PROMPT_NO_INPUT,
                                   TEMPLATES, DataError, TokenizedData, alpaca_prompt,
                                   byte_tokenizer, chat_prompts, encode_pairs, encode_prompts,
                                   load_tokenizer, pad_id, render, render_chat,
                                   require_tokenizer, tokenize)
from moka_jax.data.sources import build_datasets, load_records, tokenize_file

__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "DataError", "FIELDS", "IGNORE",
    "LLM_ADAPTERS_PROMPT_INPUT", "LLM_ADAPTERS_PROMPT_NO_INPUT", "TEMPLATES", "TokenizedData",
    "alpaca_prompt", "build_datasets", "byte_tokenizer", "chat_prompts", "encode_pairs",
    "encode_prompts", "load_records", "load_tokenizer", "pad_id", "render", "render_chat",
    "require_tokenizer", "tokenize", "tokenize_file",
]
