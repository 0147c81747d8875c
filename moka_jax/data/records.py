"""Instruction records -> prompts -> token ids: templates, tokenizers, tokenisation, IGNORE.

    tok = load_tokenizer("smollm2")                      # or "bytes", or a HF directory
    ids, labels = tokenize(records, tok, template="alpaca")
    ids = encode_prompts(tok, prompts)                   # what evaluation feeds the model

Where records come from (files, `datasets`) is moka_jax.data.sources.

Labels follow the Hugging Face convention: labels[b, t] is the target *at* position t (the
loss shifts: logits[:, :-1] predict labels[:, 1:]); -100 = ignored (prompt tokens unless
train_on_inputs). Batching (buckets, packing, label slots) is moka_jax.data.batching.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moka_jax.config import BYTE_VOCAB_SIZE, resolve_path
from moka_jax.support import files


IGNORE = -100

# tloen/alpaca-lora templates/alpaca.json (the template LLM-Adapters' finetune.py intends).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# LLM-Adapters finetune.py generate_prompt, byte for byte: its f-string keeps the source's
# 16-space indentation and trailing spaces ("sorry about the formatting disaster").
_IND = " " * 16
LLM_ADAPTERS_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request. \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n{_IND}\n"
    f"{_IND}### Input:\n{_IND}{{input}}\n{_IND}\n"
    f"{_IND}### Response:\n{_IND}")
LLM_ADAPTERS_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.  \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n{_IND}\n"
    f"{_IND}### Response:\n{_IND}")

TEMPLATES = ("alpaca", "llm-adapters", "chat", "plain")
FIELDS = {"alpaca": ("instruction", "output"), "commonsense": ("instruction", "output", "answer")}


class DataError(ValueError):
    """A problem with a data file or what is left of it after filtering."""


# ----------------------------------------------------------------------------- prompts


def alpaca_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt (everything before the response) of a text template: Alpaca, LLM-Adapters,
    or "plain" (the instruction itself, then the input on the next line): completion-style
    data such as key -> value pairs, where a 30-token instruction header would be most of
    every example's tokens."""
    if template == "plain":
        return f"{instruction}\n{input}" if input else instruction
    if template == "alpaca":
        fmt = ALPACA_PROMPT_INPUT if input else ALPACA_PROMPT_NO_INPUT
    elif template == "llm-adapters":
        fmt = LLM_ADAPTERS_PROMPT_INPUT if input else LLM_ADAPTERS_PROMPT_NO_INPUT
    else:
        raise ValueError(f"alpaca_prompt: template {template!r} is not an Alpaca template")
    return fmt.format(instruction=instruction, input=input)


def render(record: dict, template: str = "alpaca", tokenizer=None) -> tuple[str, str]:
    """(prompt, full text); full = prompt + response, so the prompt is a prefix of full."""
    if template != "chat":
        prompt = alpaca_prompt(record["instruction"], record.get("input", ""), template)
        return prompt, prompt + record["output"]
    return render_chat([record], tokenizer)[0]


def render_chat(records: list[dict], tokenizer) -> list[tuple[str, str]]:
    """(prompt, full) through the tokenizer's chat template: user = instruction [+ input]."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template 'chat' needs a tokenizer with a chat template")
    users = [[{"role": "user", "content": _user_text(r)}] for r in records]
    fulls = [u + [{"role": "assistant", "content": r["output"]}] for u, r in zip(users, records)]
    prompts = chat_prompts(tokenizer, [_user_text(r) for r in records])
    texts = tokenizer.apply_chat_template(fulls, tokenize=False)
    for p, t in zip(prompts, texts):
        if not t.startswith(p):
            raise DataError("the tokenizer's chat template does not render the prompt as a prefix "
                            "of the full conversation, so prompt tokens cannot be masked")
    return list(zip(prompts, texts))


def chat_prompts(tokenizer, users: list[str]) -> list[str]:
    """Each user message as a chat prompt, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([[{"role": "user", "content": u}] for u in users],
                                         tokenize=False, add_generation_prompt=True)


def _user_text(r: dict) -> str:
    return f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"]


# ----------------------------------------------------------------------------- tokenizers


def byte_tokenizer():
    """A file-free byte-level tokenizer (ids 0..2 = <pad>, <s>, </s>; byte b = id b + 3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update({ch: b + len(specials) for b, ch in _bytes_to_unicode().items()})
    assert len(vocab) == BYTE_VOCAB_SIZE
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    out.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n"
                         "{% endfor %}{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizes to)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def load_tokenizer(spec: str):
    """"bytes" | "smollm2" (the embedded SmolLM2-135M-Instruct, converted once to a cached HF
    directory, see models.source) | a local HF tokenizer directory. No hub access. The one
    tokenizer loader: training, evaluation, generation and moka_jax.load all come here."""
    from transformers import AutoTokenizer

    if spec == "bytes":
        return byte_tokenizer()
    if spec == "smollm2":
        from moka_jax.models.source import resolve

        return AutoTokenizer.from_pretrained(resolve("smollm2").path, local_files_only=True)
    path = resolve_path(spec)
    if not path.is_dir():
        raise DataError(f"tokenizer {spec!r} is neither 'bytes', 'smollm2' nor a directory")
    try:
        files.check_tokenizer_dir(path)
    except files.FileCheckError as e:
        raise DataError(str(e)) from None
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def require_tokenizer(tokenizer, where: str):
    """The tokenizer an evaluation or generation needs: moka_jax.load returns None for a base
    directory without tokenizer files, and that None must not reach the first encode."""
    if tokenizer is None:
        raise DataError(f"{where}: no tokenizer (the base directory has no tokenizer files); "
                        "pass one to moka_jax.load(..., tokenizer=DIR | 'bytes' | 'smollm2')")
    return tokenizer


def pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    return 0


# ----------------------------------------------------------------------------- tokenisation


def tokenize(records: list[dict], tokenizer, *, template: str = "alpaca", cutoff_len: int = 256,
             train_on_inputs: bool = False, add_eos: bool = True) -> tuple[list, list]:
    """(input_ids, labels): lists of int32 arrays, one pair per record.

    The prompt tokens are exactly encode_prompts(prompt), what evaluation feeds the model
    (see encode_pairs), so a trained model is asked its questions in the tokens it was
    trained on. As in LLM-Adapters: truncate to cutoff_len, then append EOS only if there
    is room.
    """
    pairs = render_chat(records, tokenizer) if template == "chat" else [
        render(r, template) for r in records]
    prompts = [p for p, _ in pairs]
    fulls = [f for _, f in pairs]
    ids_list, prompt_lens = encode_pairs(tokenizer, prompts, fulls, template)
    eos = tokenizer.eos_token_id
    ids_out, labels_out = [], []
    for ids, n_prompt, prompt, full in zip(ids_list, prompt_lens, prompts, fulls):
        ids = np.asarray(ids[:cutoff_len], np.int32)
        labels = ids.copy()
        if not train_on_inputs:
            labels[:n_prompt] = IGNORE
        has_eos = template == "chat" and tokenizer.eos_token in full[len(prompt):]
        if add_eos and not has_eos and eos is not None and len(ids) < cutoff_len \
                and (len(ids) == 0 or ids[-1] != eos):
            ids = np.append(ids, np.int32(eos))
            labels = np.append(labels, np.int32(eos))
        ids_out.append(ids)
        labels_out.append(labels)
    return ids_out, labels_out


def encode_prompts(tokenizer, prompts: list[str], template: str = "alpaca") -> list[list[int]]:
    """Token ids of rendered prompts, as training masks them and evaluation feeds them.

    Special tokens (a BOS) are added except for the chat template, which writes its own.
    """
    return tokenizer(list(prompts), add_special_tokens=template != "chat")["input_ids"]


def encode_pairs(tokenizer, prompts, fulls, template: str = "alpaca"):
    """(ids of each full text, number of leading prompt tokens); ids start with the prompt's
    own tokens, encode_prompts(prompt), always.

    Where the joint tokenisation of prompt + response begins with the prompt's tokens (a clean
    boundary: alpaca and chat on BPE tokenizers) the ids are the joint ones. Where a token
    straddles the boundary (byte-level BPE merges the llm-adapters template's 16 trailing
    spaces with the response's first word) no prompt could reproduce the joint tokens at
    evaluation, so the response is tokenised on its own and appended instead.
    """
    prompt_ids = encode_prompts(tokenizer, prompts, template)
    full_ids = tokenizer(list(fulls), add_special_tokens=template != "chat")["input_ids"]
    out = []
    for p_ids, f_ids, prompt, full in zip(prompt_ids, full_ids, prompts, fulls):
        if list(f_ids[:len(p_ids)]) != list(p_ids):
            tail = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
            f_ids = list(p_ids) + list(tail)
        out.append(list(f_ids))
    return out, [len(p) for p in prompt_ids]


@dataclasses.dataclass
class TokenizedData:
    """Variable-length examples plus the file each one came from (for mixing)."""

    input_ids: list
    labels: list
    source: np.ndarray            # (N,) index into `files`
    files: list
    weights: list | None = None   # per file; None = plain concatenation

    def __len__(self):
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), np.int64, len(self.input_ids))

    @property
    def label_counts(self) -> np.ndarray:
        """Next-token targets each example scores (labelled tokens after the first)."""
        return np.fromiter(((lab[1:] != IGNORE).sum() for lab in self.labels), np.int64,
                           len(self.labels))

    def subset(self, idx) -> TokenizedData:
        idx = np.asarray(idx, np.int64)
        return TokenizedData([self.input_ids[i] for i in idx], [self.labels[i] for i in idx],
                             self.source[idx], self.files, self.weights)

    @staticmethod
    def concat(parts: list[TokenizedData], weights=None) -> TokenizedData:
        files = [f for p in parts for f in p.files]
        offsets = np.cumsum([0] + [len(p.files) for p in parts])
        return TokenizedData([x for p in parts for x in p.input_ids],
                             [x for p in parts for x in p.labels],
                             np.concatenate([p.source + o for p, o in zip(parts, offsets)]).astype(np.int64),
                             files, weights)


def drop_reasons(lengths, labelled, cutoff_len: int, add_eos: bool) -> dict[str, int]:
    """{why: count} for the examples with no labelled token (nothing to learn from)."""
    reasons: dict[str, int] = {}
    for n, has_label in zip(lengths, labelled):
        if has_label:
            continue
        why = (f"a prompt that fills data.cutoff_len = {cutoff_len}" if n >= cutoff_len
               else "an empty response" + ("" if add_eos else " and data.add_eos = false (no "
                                                              "EOS token to learn)"))
        reasons[why] = reasons.get(why, 0) + 1
    return reasons


def all_dropped_error(where, n: int, dropped: dict[str, int]) -> DataError:
    fixes = [f for why, f in (("fills data.cutoff_len", "raise data.cutoff_len"),
                              ("add_eos = false", "set data.add_eos = true"),
                              ("empty response", "give the records a non-empty output"))
             if any(why in w for w in dropped)]
    return DataError(f"{where}: all {n} examples removed, none has a response token to learn: "
                     + "; ".join(f"{c} with {w}" for w, c in dropped.items())
                     + f"; {' or '.join(dict.fromkeys(fixes))}")


__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "DataError", "IGNORE",
    "LLM_ADAPTERS_PROMPT_INPUT", "LLM_ADAPTERS_PROMPT_NO_INPUT", "TEMPLATES", "TokenizedData",
    "FIELDS", "alpaca_prompt", "all_dropped_error", "byte_tokenizer", "chat_prompts",
    "drop_reasons", "encode_pairs", "encode_prompts", "load_tokenizer", "pad_id", "render",
    "render_chat", "tokenize",
]
