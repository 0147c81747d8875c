"""Instruction data through Hugging Face `datasets`: files or a Dataset -> checked columns ->
tokenised with `.map(batched=True)`, cached on disk so a second run skips tokenisation.

    ds, where = load_table("data/commonsense_train/boolq/train.json")  # or a Dataset, ...
    data = tokenize_file("my.parquet", tokenizer, fields=DataFields(output="response"))

Sources: `.json` (a list of records, or one object per line), `.jsonl`, `.parquet`, a
directory written by `Dataset.save_to_disk`, or an in-memory `datasets.Dataset`. Columns are
found through `fields` (config.DataFields: which column holds the instruction, input, output
and answer). The tokenised result is keyed by a fingerprint of the source (file contents, or
the Dataset's fingerprint), the tokenizer, the template, cutoff_len, train_on_inputs, add_eos,
the field mapping and the tokenising code, and lives under `cache_root()` (never in the
repository). `datasets.disable_caching()` turns the reuse off.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
from pathlib import Path

import datasets
import numpy as np

from moka_jax.config import DataFields, resolve_path
from moka_jax.data import records as D
from moka_jax.data.identity import file_sha256, tokenizer_fingerprint
from moka_jax.data.records import DataError, TokenizedData
from moka_jax.support import files

log = logging.getLogger(__name__)

SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
STRING = (datasets.Value("string"), datasets.Value("large_string"))
FORMAT_PARTS = D.FIELDS  # the parts each record format needs


def cache_root() -> Path:
    """$MOKA_DATA_CACHE, else <$MOKA_CACHE or ~/.cache/moka_jax>/datasets."""
    root = os.environ.get("MOKA_DATA_CACHE")
    if not root:
        root = Path(os.environ.get("MOKA_CACHE") or Path.home() / ".cache" / "moka_jax")
        root = root / "datasets"
    return Path(root).expanduser().absolute()


def is_dataset(obj) -> bool:
    return isinstance(obj, datasets.Dataset)


# ----------------------------------------------------------------------------- where a row is


class Where:
    """Names a source and its rows as a user would find them: `record i` of a JSON list,
    `line n` of JSON lines (blank lines counted), `row i` of Parquet / Arrow / a Dataset."""

    def __init__(self, source):
        self.path = None if is_dataset(source) else Path(source)
        self.name = str(source) if self.path else f"<datasets.Dataset {source._fingerprint}>"
        self._lines = None
        self.kind = "row"
        if self.path and self.path.suffix in (".json", ".jsonl") and self.path.is_file():
            listed = self.path.suffix == ".json" and _first_char(self.path) == "["
            self.kind = "record" if listed else "line"

    def row(self, i: int) -> str:
        if self.kind != "line":
            return f"{self.kind} {i}"
        if self._lines is None:
            with open(self.path, encoding="utf-8") as f:
                self._lines = [n for n, line in enumerate(f, 1) if line.strip()]
        return f"line {self._lines[i]}" if i < len(self._lines) else f"row {i}"


def _first_char(path: Path) -> str:
    # Only sniffing: a file that is not UTF-8 is named by the reader (files.read_text) later.
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            chunk = f.read(4096)
            if not chunk or chunk.strip():
                return chunk.lstrip()[:1]


# ----------------------------------------------------------------------------- loading


def _parse_json(path: Path) -> list:
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


def load_table(source, *, limit: int | None = None, cache_dir=None):
    """(datasets.Dataset, Where) of one source, cut to its first `limit` rows."""
    where = Where(source)
    if is_dataset(source):
        ds = source
    else:
        path = Path(source)
        if path.is_dir():
            ds = _load_from_disk(path)
        elif not path.is_file():
            raise DataError(f"data file not found: {path}")
        elif path.suffix not in SUFFIXES:
            raise DataError(f"{path}: unsupported data file type {path.suffix!r}; use .json, "
                            ".jsonl, .parquet or a directory written by Dataset.save_to_disk")
        else:
            ds = _load_file(path, where, cache_dir)
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{where.name}: expected a datasets.Dataset, got {type(ds).__name__}")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    if len(ds) == 0:
        raise DataError(f"{where.name}: no records")
    return ds, where


def _load_from_disk(path: Path):
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a directory written by Dataset.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path}: a DatasetDict with splits {list(ds)}; point data at one split's "
                        f"directory, e.g. {path / next(iter(ds))}")
    return ds


def _load_file(path: Path, where: Where, cache_dir):
    hf_cache = str(Path(cache_dir or cache_root()) / "hf")
    try:
        return datasets.load_dataset(SUFFIXES[path.suffix], data_files=str(path.absolute()),
                                     split="train", cache_dir=hf_cache)
    except Exception as e:  # noqa: BLE001 - any failure is diagnosed below, then reported
        if SUFFIXES[path.suffix] == "json":
            _diagnose_json(path)  # raises the precise error (file:line:col, record) if it finds one
        elif _parquet_rows(path) == 0:
            raise DataError(f"{path}: no records") from None
        cause = e.__cause__ or e
        raise DataError(f"{path}: could not be read as {SUFFIXES[path.suffix]}: "
                        f"{type(cause).__name__}: {cause}") from e


def _parquet_rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # noqa: BLE001 - unreadable: reported by the caller
        return None


def _diagnose_json(path: Path) -> None:
    """Raise the precise DataError for a JSON file datasets could not read or whose columns
    are wrong: invalid JSON (line:col), not a list, no records, records that are not objects."""
    items = _parse_json(path)
    if not items:
        raise DataError(f"{path}: no records")
    for where, r in items:
        if not isinstance(r, dict):
            raise DataError(f"{path}: {where}: expected an object, got {type(r).__name__}")


# ----------------------------------------------------------------------------- columns


def check_columns(ds, where: Where, fields: DataFields, format: str = "auto") -> str:
    """The record format ("alpaca" | "commonsense"); raise DataError naming the source, the
    first bad row and the fix when a needed column is missing, null or not a string."""
    ans = fields.answer
    if format == "auto":
        format = "commonsense" if ans in ds.column_names and \
            ds.features[ans] in STRING and _first_null(ds, ans) is None else "alpaca"
    if format not in FORMAT_PARTS:
        raise DataError(f"unknown data format {format!r}; choose one of {sorted(FORMAT_PARTS)}")
    parts = list(FORMAT_PARTS[format])
    problems = []  # (row, message): the earliest row is reported
    if fields.input in ds.column_names or fields.input != DataFields.input:
        parts.insert(1, "input")  # `input` may be absent (= "") unless renamed explicitly
    for part in parts:
        col = getattr(fields, part)
        need = f"{format} format needs {[getattr(fields, p) for p in FORMAT_PARTS[format]]}"
        if col not in ds.column_names:
            if where.path is not None and where.path.suffix in (".json", ".jsonl"):
                _diagnose_json(where.path)
            problems.append((0, f"missing field {col!r} ({need}); the data's fields are "
                                f"{ds.column_names}: set data.fields.{part} to the one that "
                                f"holds the {part}"))
            continue
        feature = ds.features[col]
        if feature == datasets.Value("null"):
            if part != "input":
                problems.append((0, f"missing field {col!r} (null in every row; {need})"))
        elif feature in STRING:
            i = None if part == "input" else _first_null(ds, col)
            if i is not None:
                problems.append((i, f"missing field {col!r} (absent or null; {need})"))
        else:
            if where.path is not None and where.path.suffix in (".json", ".jsonl"):
                _diagnose_json(where.path)
            i, v = next((i, v) for i, v in enumerate(ds[col])
                        if v is not None and not isinstance(v, str))
            problems.append((i, f"field {col!r} is {type(v).__name__}, expected a string"
                                + (f" (data.fields.{part})" if col != part else "")))
    if problems:
        i, msg = min(problems, key=lambda p: p[0])
        raise DataError(f"{where.name}: {where.row(i)}: {msg}")
    return format


def _first_null(ds, col) -> int | None:
    nulls = ds.with_format("arrow")[col].is_null()
    idx = np.flatnonzero(nulls.to_numpy(zero_copy_only=False))
    return int(idx[0]) if len(idx) else None


def records_of(ds, fields: DataFields, format: str) -> list[dict]:
    """Plain {instruction, input, output[, answer]} dicts (input "" where absent)."""
    cols = [getattr(fields, p) for p in FORMAT_PARTS[format]]
    has_input = fields.input in ds.column_names
    cols += [fields.input] if has_input else []
    batch = ds.select_columns(list(dict.fromkeys(cols))).to_dict()
    return _records(batch, len(ds), fields, format, has_input)


def _records(batch: dict, n: int, fields: DataFields, format: str, has_input: bool) -> list[dict]:
    inputs = batch[fields.input] if has_input else [""] * n
    out = []
    for i in range(n):
        rec = {"instruction": batch[fields.instruction][i], "input": inputs[i] or "",
               "output": batch[fields.output][i]}
        if format == "commonsense":
            rec["answer"] = batch[fields.answer][i]
        out.append(rec)
    return out


def load_records(source, format: str = "auto", limit: int | None = None,
                 fields: DataFields | None = None, cache_dir=None) -> tuple[list[dict], str]:
    """Records {instruction, input, output[, answer]} of one source, and its format.

    source: a .json / .jsonl / .parquet file, a Dataset.save_to_disk directory or a
    datasets.Dataset. format "auto": "commonsense" when every record has `answer`, else
    "alpaca". `input` may be missing (= ""). limit: keep the first `limit` records. fields: a
    config.DataFields naming the columns (default: the parts' own names).
    """
    fields = fields or DataFields()
    ds, where = load_table(source, limit=limit, cache_dir=cache_dir)
    format = check_columns(ds, where, fields, format)
    return records_of(ds, fields, format), format


# ----------------------------------------------------------------------------- tokenisation


def tokenize_file(source, tokenizer, *, format: str = "auto", limit: int | None = None,
                    template: str = "alpaca", cutoff_len: int = 256, train_on_inputs: bool = False,
                    add_eos: bool = True, fields: DataFields | None = None, cache_dir=None,
                    report: list | None = None):
    """One source -> data.TokenizedData, through a cached `.map(batched=True)`; examples with
    no response token left after cutoff are dropped (all of them dropped is an error, naming
    why). report: if given, gets {"file", "records", "kept", "dropped": {why: count}}."""
    fields = fields or DataFields()
    ds, where = load_table(source, limit=limit, cache_dir=cache_dir)
    format = check_columns(ds, where, fields, format)
    kw = dict(template=template, cutoff_len=cutoff_len, train_on_inputs=train_on_inputs,
              add_eos=add_eos)
    has_input = fields.input in ds.column_names

    def tokenize_batch(batch):
        recs = _records(batch, len(batch[fields.instruction]), fields, "alpaca", has_input)
        ids, labels = D.tokenize(recs, tokenizer, **kw)
        return {"input_ids": ids, "labels": labels}

    key = _cache_key(source, ds, limit, tokenizer, fields, format, kw)
    cache_file = None
    if key is not None:
        (Path(cache_dir or cache_root()) / "tokenized").mkdir(parents=True, exist_ok=True)
        cache_file = str(Path(cache_dir or cache_root()) / "tokenized" / f"{key}.arrow")
    ids_feature = datasets.List(datasets.Value("int32"))
    out = ds.map(tokenize_batch, batched=True, remove_columns=ds.column_names,
                 features=datasets.Features({"input_ids": ids_feature, "labels": ids_feature}),
                 cache_file_name=cache_file, new_fingerprint=key,
                 load_from_cache_file=None if key else False,
                 desc=f"tokenising {_short(where.name)}")
    (ids, offsets), (labels, _) = _flat(out, "input_ids"), _flat(out, "labels")
    labelled = np.concatenate([[0], np.cumsum(labels != D.IGNORE)])
    keep = np.flatnonzero(labelled[offsets[1:]] > labelled[offsets[:-1]])
    labelled_rows = np.zeros(len(ds), bool)
    labelled_rows[keep] = True
    dropped = D.drop_reasons(np.diff(offsets), labelled_rows, cutoff_len, add_eos)
    if not len(keep):
        raise D.all_dropped_error(where.name, len(ds), dropped)
    if report is not None:  # training.plan prints the counts and the reasons
        report.append({"file": str(where.name), "records": len(ds), "kept": len(keep),
                       "dropped": dropped})
    rows = [slice(offsets[i], offsets[i + 1]) for i in keep]
    return TokenizedData([ids[r] for r in rows], [labels[r] for r in rows],
                        np.zeros(len(keep), np.int64), [where.name])


def build_datasets(data_cfg, tokenizer, report: list | None = None
                   ) -> tuple[TokenizedData, TokenizedData | None]:
    """(train, val) from a config.DataConfig: per-file limits, mixing weights, held-out split.
    Every source is loaded and its columns checked before anything is compiled.
    report: collects tokenize_file's per-source counts (train sources first, then val)."""
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


def _short(name: str) -> str:
    return "/".join(Path(name).parts[-2:])


def _flat(ds, col) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> column as (all values, int32; row offsets): row i = values[o[i]:o[i+1]]."""
    arr = ds.with_format("arrow")[col].combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return np.array(arr.flatten().to_numpy(zero_copy_only=False), np.int32), offsets - offsets[0]


def _cache_key(source, ds, limit, tokenizer, fields, format, kw) -> str | None:
    """A fingerprint of everything the tokenised rows depend on; None = do not cache."""
    tok = tokenizer_fingerprint(tokenizer)  # None: tokenise without a cache
    if tok is None:
        return None
    if is_dataset(source) or Path(source).is_dir():
        src = ds._fingerprint  # datasets' own: content + transforms (+ files' mtimes)
    else:
        src = file_sha256(Path(source))
    parts = {"source": src, "limit": limit, "tokenizer": tok, "format": format,
             "fields": [fields.instruction, fields.input, fields.output], **kw,
             "code": hashlib.sha256(inspect.getsource(D).encode()
                                    + inspect.getsource(sys.modules[__name__]).encode()).hexdigest(),
             "datasets": datasets.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


__all__ = ["SUFFIXES", "Where", "build_datasets", "cache_root", "check_columns", "is_dataset",
           "load_records", "load_table", "records_of", "tokenize_file"]
