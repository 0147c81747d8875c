"""Instruction data: JSON / JSONL / Parquet / `datasets` sources -> prompts -> token ids.

    tok = load_tokenizer("smollm2")                      # or "bytes", or a HF directory
    train, val = build_datasets(cfg.data, tok)           # TokenizedData: ids + labels per example

Labels follow the Hugging Face convention: labels[b, t] is the target *at* position t (the
loss shifts: logits[:, :-1] predict labels[:, 1:]); -100 = ignored (prompt tokens unless
train_on_inputs). Batching (buckets, packing, label slots) is moka_jax.batching.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from moka_jax import files
from moka_jax.config import BYTE_VOCAB_SIZE, resolve_path


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


# ----------------------------------------------------------------------------- records


def _parse_file(path: Path) -> list:
    try:
        text = files.read_text(path, "data file", "give a JSON list of records or JSON lines")
    except files.FileCheckError as e:
        raise DataError(str(e)) from None
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if not (e.msg == "Extra data" and text.lstrip().startswith("{")):
                raise DataError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}; the file "
                                "may be truncated or corrupt") from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
            return [(f"record {i}", r) for i, r in enumerate(data)]
    out = []  # JSON lines (also a .json file holding one object per line)
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}:{e.colno}: invalid JSON: {e.msg}; the file may be "
                                "truncated or corrupt") from None
    return out


def load_records(path, format: str = "auto", limit: int | None = None,
                 fields=None) -> tuple[list[dict], str]:
    """Records {instruction, input, output[, answer]} of one source, and its format.

    path: a .json / .jsonl / .parquet file, a Dataset.save_to_disk directory or a
    datasets.Dataset (loaded through `datasets`, see datasets_io). format "auto":
    "commonsense" when every record has `answer`, else "alpaca". `input` may be missing
    (= ""). limit: keep the first `limit` records. fields: a config.DataFields naming the
    columns (default: the parts' own names).
    """
    from moka_jax import datasets_io

    return datasets_io.load_records(path, format, limit, fields)


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
    prompts = tokenizer.apply_chat_template(users, tokenize=False, add_generation_prompt=True)
    texts = tokenizer.apply_chat_template(fulls, tokenize=False)
    for p, t in zip(prompts, texts):
        if not t.startswith(p):
            raise DataError("the tokenizer's chat template does not render the prompt as a prefix "
                            "of the full conversation, so prompt tokens cannot be masked")
    return list(zip(prompts, texts))


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
    directory by models.gguf.ensure_smollm2) | a local HF tokenizer directory. No hub access."""
    from transformers import AutoTokenizer

    if spec == "bytes":
        return byte_tokenizer()
    if spec == "smollm2":
        from moka_jax.models.gguf import ensure_smollm2

        return AutoTokenizer.from_pretrained(ensure_smollm2(), local_files_only=True)
    path = resolve_path(spec)
    if not path.is_dir():
        raise DataError(f"tokenizer {spec!r} is neither 'bytes', 'smollm2' nor a directory")
    try:
        files.check_tokenizer_dir(path)
    except files.FileCheckError as e:
        raise DataError(str(e)) from None
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


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


def tokenize_file(path, tokenizer, *, format: str = "auto", limit: int | None = None,
                  template: str = "alpaca", cutoff_len: int = 256, train_on_inputs: bool = False,
                  add_eos: bool = True, fields=None, cache_dir=None,
                  report: list | None = None) -> TokenizedData:
    """One source (see load_records) -> TokenizedData, dropping examples with no response token
    left after cutoff; tokenised by a cached datasets `.map` (datasets_io.tokenize_source).
    report: if given, {"file", "records", "kept", "dropped": {why: count}} is appended."""
    from moka_jax import datasets_io

    return datasets_io.tokenize_source(
        path, tokenizer, format=format, limit=limit, template=template, cutoff_len=cutoff_len,
        train_on_inputs=train_on_inputs, add_eos=add_eos, fields=fields, cache_dir=cache_dir,
        report=report)


def build_datasets(data_cfg, tokenizer, report: list | None = None
                   ) -> tuple[TokenizedData, TokenizedData | None]:
    """(train, val) from a config.DataConfig: per-file limits, mixing weights, held-out split.
    Every source is loaded and its columns checked before anything is compiled.
    report: collects tokenize_file's per-source counts (train sources first, then val)."""
    from moka_jax.datasets_io import is_dataset

    kw = dict(format=data_cfg.format, template=data_cfg.template, cutoff_len=data_cfg.cutoff_len,
              train_on_inputs=data_cfg.train_on_inputs, add_eos=data_cfg.add_eos,
              fields=data_cfg.fields, report=report)

    def load(files):
        return [tokenize_file(f.path if is_dataset(f.path) else resolve_path(f.path), tokenizer,
                              limit=f.limit, **kw) for f in files]

    weights = [f.weight for f in data_cfg.train]
    train = TokenizedData.concat(load(data_cfg.train), None if None in weights else weights)
    vals = []
    if data_cfg.val_size:
        if data_cfg.val_size >= len(train):
            raise DataError(f"data.val_size = {data_cfg.val_size} leaves no training examples "
                            f"(only {len(train)} after filtering)")
        perm = np.random.default_rng(data_cfg.seed).permutation(len(train))
        vals.append(train.subset(np.sort(perm[:data_cfg.val_size])))
        train = train.subset(np.sort(perm[data_cfg.val_size:]))
    vals += load(data_cfg.val)
    return train, (TokenizedData.concat(vals) if vals else None)


__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "DataError", "IGNORE",
    "LLM_ADAPTERS_PROMPT_INPUT", "LLM_ADAPTERS_PROMPT_NO_INPUT", "TEMPLATES", "TokenizedData",
    "alpaca_prompt", "build_datasets", "byte_tokenizer", "encode_pairs", "encode_prompts",
    "load_records", "load_tokenizer", "pad_id", "render", "render_chat", "tokenize",
    "tokenize_file",
]
