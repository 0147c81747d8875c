"""Instruction data: JSON / JSONL / Parquet / `datasets` sources -> prompts -> token ids -> batches.

    tok = load_tokenizer("smollm2")                      # or "bytes", or a HF directory
    train, val = build_datasets(cfg.data, tok)
    it = BatchIterator(train, cfg.train.batch_size, cfg.data.buckets, seed=cfg.data.seed,
                       pad_id=pad_id(tok))
    batch = next(it)        # {"input_ids", "attention_mask", "labels"}: (B, T) int32 numpy
    state = it.state()      # {"epoch", "position", "seed"}; it.restore(state) resumes exactly

Labels follow the Hugging Face convention: labels[b, t] is the target *at* position t (the
loss shifts: logits[:, :-1] predict labels[:, 1:]); -100 = ignored (prompt tokens unless
train_on_inputs, padding). Padding is on the right. T is always one of the configured
buckets, so a jitted step compiles at most len(buckets) times.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from moka_jax import files
from moka_jax.config import BYTE_VOCAB_SIZE, resolve_path

log = logging.getLogger(__name__)

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

TEMPLATES = ("alpaca", "llm-adapters", "chat")
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
    """The prompt (everything before the response) of the Alpaca / LLM-Adapters template."""
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


# ----------------------------------------------------------------------------- batching


def bucket_index(lengths, buckets) -> np.ndarray:
    """Index of the smallest bucket >= each length."""
    idx = np.searchsorted(np.asarray(buckets), np.asarray(lengths), side="left")
    if np.any(idx >= len(buckets)):
        raise DataError(f"an example of length {int(np.max(lengths))} exceeds the largest bucket "
                        f"{buckets[-1]}")
    return idx


def collate(data: TokenizedData, idx, buckets, pad_id: int = 0, rows: slice | None = None) -> dict:
    """Pad examples `idx` on the right (one per row) to the smallest bucket holding the longest."""
    lengths = np.array([len(data.input_ids[i]) for i in idx])
    T = int(buckets[bucket_index([lengths.max()], buckets)[0]])
    idx = list(idx)[rows] if rows is not None else list(idx)
    return collate_rows(data, [[i] for i in idx], T, pad_id)


def collate_rows(data: TokenizedData, rows: list, T: int, pad_id: int = 0) -> dict:
    """Rows of (T,) tokens, each holding the examples `rows[r]` back to back, then padding.

    input_ids, labels (HF convention, unshifted), attention_mask (1 on real tokens),
    segment_ids (1, 2, ... per example in a row; 0 on padding) and positions (restarting at
    0 for every example, so RoPE sees each example as if it were alone).
    """
    B = len(rows)
    out = {"input_ids": np.full((B, T), pad_id, np.int32),
           "attention_mask": np.zeros((B, T), np.int32),
           "labels": np.full((B, T), IGNORE, np.int32),
           "segment_ids": np.zeros((B, T), np.int32),
           "positions": np.zeros((B, T), np.int32)}
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members, 1):
            n = len(data.input_ids[i])
            if at + n > T:
                raise DataError(f"row {r}: examples of {at + n} tokens do not fit in {T}")
            sl = slice(at, at + n)
            out["input_ids"][r, sl] = data.input_ids[i]
            out["labels"][r, sl] = data.labels[i]
            out["segment_ids"][r, sl] = s
            out["positions"][r, sl] = np.arange(n)
            at += n
        out["attention_mask"][r, :at] = 1
    return out


def next_token_targets(labels_BT, segment_ids_BT) -> np.ndarray:
    """(B, T) target predicted *at* each position: the next token's label when it belongs to
    the same example, else IGNORE (so no example predicts its neighbour's first token)."""
    tgt = np.full(labels_BT.shape, IGNORE, np.int32)
    same = (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]) & (segment_ids_BT[:, :-1] > 0)
    tgt[:, :-1] = np.where(same, labels_BT[:, 1:], IGNORE)
    return tgt


def label_slots(batch: dict, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(loss_pos, loss_tgt), each (B, capacity) int32: per row the positions whose next-token
    prediction is scored and their targets (IGNORE-filled), so the train step applies the
    lm_head to these hidden states only and the (B, T, V) logits never exist."""
    return _slots(next_token_targets(batch["labels"], batch["segment_ids"]), capacity)


def _slots(tgt_BT, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    B = tgt_BT.shape[0]
    pos = np.zeros((B, capacity), np.int32)
    tgt = np.full((B, capacity), IGNORE, np.int32)
    for r in range(B):
        p = np.flatnonzero(tgt_BT[r] != IGNORE)
        if len(p) > capacity:
            raise DataError(f"row {r} has {len(p)} labelled tokens, over the capacity {capacity}")
        pos[r, :len(p)], tgt[r, :len(p)] = p, tgt_BT[r, p]
    return pos, tgt


def with_label_slots(batch: dict, capacity: int | None = None) -> dict:
    """The batch plus loss_pos / loss_tgt; capacity defaults to its own busiest row (rounded),
    and is raised to it when given smaller (never dropping a label)."""
    tgt_BT = next_token_targets(batch["labels"], batch["segment_ids"])
    need = round_capacity(int((tgt_BT != IGNORE).sum(1).max()))
    pos, tgt = _slots(tgt_BT, need if capacity is None else max(capacity, need))
    return {**batch, "loss_pos": pos, "loss_tgt": tgt}


def labelled_per_row(batch: dict) -> np.ndarray:
    return (next_token_targets(batch["labels"], batch["segment_ids"]) != IGNORE).sum(1)


def round_capacity(n: int, multiple: int = 16) -> int:
    return max(multiple, -(-int(n) // multiple) * multiple)


def pack_rows(order, lengths, row_len: int, rows_per_batch: int,
              window: int = 4) -> list[list[list[int]]]:
    """Pack `order` into batches of `rows_per_batch` rows of `row_len` tokens, deterministically.

    First fit over a pool of up to `window` x rows_per_batch open rows, in the given order;
    when an example fits no open row and the pool is full, the rows_per_batch fullest rows
    leave as a batch. A wider pool fills rows better at the cost of moving examples a few
    batches from their shuffled place. At the end the pool empties in batches, the last one
    completed with empty rows, so an epoch sees every example exactly once.
    """
    batches, rows, free = [], [], []
    cap = window * rows_per_batch

    def emit(k):
        keep = sorted(sorted(range(len(rows)), key=lambda j: free[j])[:k])
        batches.append([rows[j] for j in keep] + [[] for _ in range(rows_per_batch - len(keep))])
        for j in reversed(keep):
            del rows[j], free[j]

    for i in order:
        n = int(lengths[i])
        r = next((k for k, f in enumerate(free) if f >= n), None)
        if r is None:
            if len(rows) == cap:
                emit(rows_per_batch)
            rows.append([])
            free.append(row_len)
            r = len(rows) - 1
        rows[r].append(int(i))
        free[r] -= n
    while rows:
        emit(min(rows_per_batch, len(rows)))
    return batches


class BatchIterator:
    """Endless, deterministic, resumable batches of `batch_size` (global) rows.

    Epoch e draws the epoch's examples (mixing weights, if any) and shuffles them with
    default_rng([seed, e]). Unpacked: one example per row; one pending batch per bucket is
    filled in that order and emitted when full (leftovers carry up into the next bucket,
    fewer than batch_size examples are dropped per epoch). Packed (`packing=True`): examples
    are packed in order, first fit, several per row, into rows of the largest bucket, so every
    batch has one shape (one compile) and little padding; batch_size then counts rows. The plan
    depends only on (seed, epoch), so `state()` = (epoch, position) restores exactly the same
    remaining batches.

    Each batch also carries `loss_pos` / `loss_tgt` (see `label_slots`) with a static per-row
    capacity per row length, derived from the first epochs' plans; a batch over it raises the
    capacity (one more compile) rather than dropping a label.

    process_index / process_count: yield only this host's rows of each global batch.
    """

    def __init__(self, data: TokenizedData, batch_size: int, buckets, *, seed: int = 0,
                 pad_id: int = 0, shuffle: bool = True, packing: bool = False,
                 process_index: int = 0, process_count: int = 1):
        if batch_size % process_count:
            raise DataError(f"batch_size {batch_size} does not divide by {process_count} processes")
        self.data, self.batch_size, self.buckets = data, batch_size, list(buckets)
        self.seed, self.pad_id, self.shuffle, self.packing = int(seed), pad_id, shuffle, packing
        local = batch_size // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)
        self._lengths = data.lengths
        self._bucket = bucket_index(self._lengths, self.buckets)
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = None, None
        if not self.plan(0):
            raise DataError(f"{len(data)} examples (after filtering and the val split) make no "
                            f"batch of {batch_size}; lower train.batch_size or add data")
        self.capacity = self._initial_capacity()

    def _pool(self, rng) -> np.ndarray:
        """The epoch's example indices: all of them, or a weighted draw per file."""
        if self.data.weights is None:
            return np.arange(len(self.data))
        w = np.asarray(self.data.weights, np.float64)
        quotas = np.round(w / w.sum() * len(self.data)).astype(np.int64)
        parts = []
        for s, quota in enumerate(quotas):
            members = np.flatnonzero(self.data.source == s)
            reps = -(-quota // len(members))  # ceil: repeat small files as often as needed
            parts.append(np.concatenate([rng.permutation(members) for _ in range(reps)])[:quota])
        return np.concatenate(parts)

    def plan(self, epoch: int) -> list[tuple[int, list]]:
        """The batches of `epoch`, in order: (row length T, rows of example indices)."""
        if self._plan_epoch == epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        order = self._pool(rng)
        if self.shuffle:
            order = rng.permutation(order)
        if self.packing:
            T = self.buckets[-1]
            batches = [(T, rows) for rows in
                       pack_rows(order, self._lengths, T, self.batch_size)]
        else:
            batches = [(int(self.buckets[self._bucket[idx].max()]), [[int(i)] for i in idx])
                       for idx in self._bucket_batches(order)]
        self._plan_epoch, self._plan = epoch, batches
        return batches

    def _bucket_batches(self, order) -> list[np.ndarray]:
        B, batches = self.batch_size, []
        pending = [[] for _ in self.buckets]
        for i in order:
            p = pending[self._bucket[i]]
            p.append(i)
            if len(p) == B:
                batches.append(np.array(p))
                p.clear()
        carry = []
        for p in pending:
            carry += p
            while len(carry) >= B:
                batches.append(np.array(carry[:B]))
                carry = carry[B:]
        return batches

    def _initial_capacity(self, epochs: int = 3) -> dict[int, int]:
        """Per row length, labelled tokens a row may hold: the most in the first epochs' plans."""
        n_lab = self.data.label_counts
        cap: dict[int, int] = {}
        for e in range(epochs):
            for T, rows in self.plan(e):
                most = max(int(n_lab[r].sum()) if r else 0 for r in rows)
                cap[T] = max(cap.get(T, 0), most)
        self._plan_epoch = None  # re-plan the current epoch lazily
        return {T: round_capacity(c) for T, c in cap.items()}

    @property
    def steps_per_epoch(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        plan = self.plan(self.epoch)
        if self.position >= len(plan):
            self.epoch, self.position = self.epoch + 1, 0
            plan = self.plan(self.epoch)
        T, rows = plan[self.position]
        self.position += 1
        batch = with_label_slots(collate_rows(self.data, rows, T, self.pad_id),
                                 self.capacity.get(T, 0))
        used = batch["loss_pos"].shape[1]
        if used > self.capacity.get(T, 0):
            log.warning("a batch row has more labelled tokens than the capacity %d of rows of "
                        "%d: raising it to %d (one more compile)", self.capacity.get(T, 0), T,
                        used)
            self.capacity[T] = used
        return {k: v[self.rows] for k, v in batch.items()}

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise DataError(f"data state has seed {state['seed']}, this iterator {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(data: TokenizedData, batch_size: int, buckets, pad_id: int = 0):
    """Every example once, in file order grouped by bucket; the last batch of a bucket is
    filled with empty rows (no tokens, no labels) so shapes stay (batch_size, T). Label slots
    hold the most labelled tokens of any example, so one shape serves each bucket."""
    bucket = bucket_index(data.lengths, buckets)
    capacity = round_capacity(int(data.label_counts.max()))
    for b in range(len(buckets)):
        members = np.flatnonzero(bucket == b)
        for start in range(0, len(members), batch_size):
            idx = [int(i) for i in members[start:start + batch_size]]
            rows = [[i] for i in idx] + [[] for _ in range(batch_size - len(idx))]
            yield with_label_slots(collate_rows(data, rows, int(buckets[b]), pad_id), capacity)


__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "BatchIterator", "DataError", "IGNORE",
    "LLM_ADAPTERS_PROMPT_INPUT", "LLM_ADAPTERS_PROMPT_NO_INPUT", "TEMPLATES", "TokenizedData",
    "alpaca_prompt", "bucket_index", "build_datasets", "byte_tokenizer", "collate",
    "collate_rows", "encode_pairs", "encode_prompts", "eval_batches", "label_slots",
    "load_records", "load_tokenizer", "next_token_targets", "pack_rows", "pad_id", "render",
    "render_chat", "with_label_slots",
    "tokenize", "tokenize_file",
]
