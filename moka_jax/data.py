"""Instruction data: local JSON / JSONL files -> prompts -> token ids -> bucketed batches.

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


def load_records(path, format: str = "auto", limit: int | None = None) -> tuple[list[dict], str]:
    """Records {instruction, input, output[, answer]} of one file, and its format.

    format "auto": "commonsense" when every record has `answer`, else "alpaca".
    `input` may be missing (= ""). limit: keep the first `limit` records.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    items = _parse_file(path)
    if limit is not None:
        items = items[:limit]
    if not items:
        raise DataError(f"{path}: no records")
    for where, r in items:
        if not isinstance(r, dict):
            raise DataError(f"{path}: {where}: expected an object, got {type(r).__name__}")
    if format == "auto":
        format = "commonsense" if all("answer" in r for _, r in items) else "alpaca"
    if format not in FIELDS:
        raise DataError(f"unknown data format {format!r}; choose one of {sorted(FIELDS)}")
    records = []
    for where, r in items:
        for name in FIELDS[format]:
            if name not in r:
                raise DataError(f"{path}: {where}: missing field {name!r} ({format} format needs "
                                f"{list(FIELDS[format])})")
        rec = {"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]}
        if format == "commonsense":
            rec["answer"] = r["answer"]
        for name, v in rec.items():
            if not isinstance(v, str):
                raise DataError(f"{path}: {where}: field {name!r} is {type(v).__name__}, expected a string")
        records.append(rec)
    return records, format


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

    The full text is tokenised once (batched) and a token is a prompt token when it starts
    inside the prompt's characters, so the mask follows the joint tokenisation exactly
    (a slow tokenizer without offsets masks len(tokenize(prompt)) tokens instead).
    As in LLM-Adapters: truncate to cutoff_len, then append EOS only if there is room.
    """
    pairs = render_chat(records, tokenizer) if template == "chat" else [
        render(r, template) for r in records]
    prompts = [p for p, _ in pairs]
    fulls = [f for _, f in pairs]
    special = template != "chat"  # a chat template writes its own BOS
    ids_list, prompt_lens = _encode(tokenizer, prompts, fulls, special)
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


def _encode(tokenizer, prompts, fulls, special):
    """Token ids of `fulls` and, per text, how many leading tokens belong to the prompt."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encs = backend.encode_batch(fulls, add_special_tokens=special)
        return [e.ids for e in encs], [_prompt_tokens(e.offsets, len(p)) for e, p in zip(encs, prompts)]
    ids = tokenizer(fulls, add_special_tokens=special)["input_ids"]
    n_prompt = [len(x) for x in tokenizer(prompts, add_special_tokens=special)["input_ids"]]
    return ids, n_prompt


def _prompt_tokens(offsets, prompt_chars: int) -> int:
    """Index of the first real token (special tokens have empty spans) starting at or after
    the prompt's last character; tokens straddling the boundary count as prompt."""
    spans = np.asarray(offsets, np.int64).reshape(-1, 2)
    response = np.flatnonzero((spans[:, 0] >= prompt_chars) & (spans[:, 1] > spans[:, 0]))
    return int(response[0]) if len(response) else len(spans)


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


def drop_reasons(ids: list, labels: list, cutoff_len: int, add_eos: bool) -> dict[str, int]:
    """{why: count} for the examples with no labelled token (nothing to learn from)."""
    reasons: dict[str, int] = {}
    for x, lab in zip(ids, labels):
        if (lab != IGNORE).any():
            continue
        why = (f"a prompt that fills data.cutoff_len = {cutoff_len}" if len(x) >= cutoff_len
               else "an empty response" + ("" if add_eos else " and data.add_eos = false (no "
                                                              "EOS token to learn)"))
        reasons[why] = reasons.get(why, 0) + 1
    return reasons


def tokenize_file(path, tokenizer, *, format: str = "auto", limit: int | None = None,
                  template: str = "alpaca", cutoff_len: int = 256, train_on_inputs: bool = False,
                  add_eos: bool = True, report: list | None = None) -> TokenizedData:
    """One file -> TokenizedData, dropping examples with no response token left after cutoff.

    report: if given, {"file", "records", "kept", "dropped": {why: count}} is appended.
    """
    records, _ = load_records(path, format, limit)
    ids, labels = tokenize(records, tokenizer, template=template, cutoff_len=cutoff_len,
                           train_on_inputs=train_on_inputs, add_eos=add_eos)
    keep = [i for i, lab in enumerate(labels) if (lab != IGNORE).any()]
    dropped = drop_reasons(ids, labels, cutoff_len, add_eos)
    if not keep:
        fixes = [f for why, f in (("fills data.cutoff_len", "raise data.cutoff_len"),
                                  ("add_eos = false", "set data.add_eos = true"),
                                  ("empty response", "give the records a non-empty output"))
                 if any(why in w for w in dropped)]
        raise DataError(f"{path}: all {len(records)} examples removed, none has a response "
                        "token to learn: " + "; ".join(f"{n} with {w}" for w, n in dropped.items())
                        + f"; {' or '.join(dict.fromkeys(fixes))}")
    if report is not None:
        report.append({"file": str(path), "records": len(records), "kept": len(keep),
                       "dropped": dropped})
    return TokenizedData([ids[i] for i in keep], [labels[i] for i in keep],
                         np.zeros(len(keep), np.int64), [str(path)])


def build_datasets(data_cfg, tokenizer, report: list | None = None
                   ) -> tuple[TokenizedData, TokenizedData | None]:
    """(train, val) from a config.DataConfig: per-file limits, mixing weights, held-out split.
    report: collects tokenize_file's per-file counts (train files first, then val files)."""
    kw = dict(format=data_cfg.format, template=data_cfg.template, cutoff_len=data_cfg.cutoff_len,
              train_on_inputs=data_cfg.train_on_inputs, add_eos=data_cfg.add_eos, report=report)

    def load(files):
        return [tokenize_file(resolve_path(f.path), tokenizer, limit=f.limit, **kw) for f in files]

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
    """Pad examples `idx` on the right to the smallest bucket holding the longest of them."""
    lengths = np.array([len(data.input_ids[i]) for i in idx])
    T = int(buckets[bucket_index([lengths.max()], buckets)[0]])
    idx = list(idx)[rows] if rows is not None else list(idx)
    B = len(idx)
    input_ids = np.full((B, T), pad_id, np.int32)
    attention_mask = np.zeros((B, T), np.int32)
    labels = np.full((B, T), IGNORE, np.int32)
    for r, i in enumerate(idx):
        n = len(data.input_ids[i])
        input_ids[r, :n] = data.input_ids[i]
        attention_mask[r, :n] = 1
        labels[r, :n] = data.labels[i]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class BatchIterator:
    """Endless, deterministic, resumable batches of `batch_size` (global) examples.

    Epoch e: draw the epoch's examples (mixing weights, if any), shuffle them with
    default_rng([seed, e]), then fill one pending batch per bucket in that order, emitting a
    batch whenever one is full. Leftovers are carried up into the next bucket; fewer than
    batch_size examples are dropped per epoch. The plan depends only on (seed, epoch), so
    `state()` = (epoch, position) restores exactly the same remaining batches.

    process_index / process_count: yield only this host's rows of each global batch.
    """

    def __init__(self, data: TokenizedData, batch_size: int, buckets, *, seed: int = 0,
                 pad_id: int = 0, shuffle: bool = True, process_index: int = 0,
                 process_count: int = 1):
        if batch_size % process_count:
            raise DataError(f"batch_size {batch_size} does not divide by {process_count} processes")
        self.data, self.batch_size, self.buckets = data, batch_size, list(buckets)
        self.seed, self.pad_id, self.shuffle = int(seed), pad_id, shuffle
        local = batch_size // process_count
        self.rows = slice(process_index * local, (process_index + 1) * local)
        self._bucket = bucket_index(data.lengths, self.buckets)
        self.epoch, self.position = 0, 0
        self._plan_epoch, self._plan = None, None
        if not self.plan(0):
            raise DataError(f"{len(data)} examples (after filtering and the val split) make no "
                            f"batch of {batch_size}; lower train.batch_size or add data")

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

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The batches (example index arrays) of `epoch`, in order."""
        if self._plan_epoch == epoch:
            return self._plan
        rng = np.random.default_rng([self.seed, epoch])
        order = self._pool(rng)
        if self.shuffle:
            order = rng.permutation(order)
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
        self._plan_epoch, self._plan = epoch, batches
        return batches

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
        idx = plan[self.position]
        self.position += 1
        return collate(self.data, idx, self.buckets, self.pad_id, self.rows)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise DataError(f"data state has seed {state['seed']}, this iterator {self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(data: TokenizedData, batch_size: int, buckets, pad_id: int = 0):
    """Every example once, in file order grouped by bucket; the last batch of a bucket is
    filled with empty rows (attention_mask 0, labels -100) so shapes stay (batch_size, T)."""
    bucket = bucket_index(data.lengths, buckets)
    for b in range(len(buckets)):
        members = np.flatnonzero(bucket == b)
        for start in range(0, len(members), batch_size):
            idx = members[start:start + batch_size]
            batch = collate(data, idx, buckets, pad_id)
            missing = batch_size - len(idx)
            if missing:
                T = batch["input_ids"].shape[1]
                fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE}
                batch = {k: np.concatenate([v, np.full((missing, T), fill[k], np.int32)])
                         for k, v in batch.items()}
            yield batch


__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "BatchIterator", "DataError", "IGNORE",
    "LLM_ADAPTERS_PROMPT_INPUT", "LLM_ADAPTERS_PROMPT_NO_INPUT", "TEMPLATES", "TokenizedData",
    "alpaca_prompt", "bucket_index", "build_datasets", "byte_tokenizer", "collate",
    "eval_batches", "load_records", "load_tokenizer", "pad_id", "render", "render_chat",
    "tokenize", "tokenize_file",
]
