"""Data through `datasets`: every source kind tokenises exactly as data.tokenize does on the
same records, field names map, a second run reuses the cached `.map`, and bad data is named
(source, row, fix) before any model is built."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from moka_jax import config as C
from moka_jax import data as D
from moka_jax.data import records as data_records
from moka_jax.data import sources as DIO

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "data/commonsense_train"
KW = dict(template="alpaca", cutoff_len=1024,  # byte tokens: ARC prompts are long
          train_on_inputs=False, add_eos=True)


@pytest.fixture(scope="module")
def btok():
    return D.byte_tokenizer()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOKA_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def shipped(name, n):
    """The first n records of a shipped training file, as the pre-`datasets` loader gave them."""
    recs = json.loads((TRAIN / name / "train.json").read_text())[:n]
    return [{"instruction": r["instruction"], "input": r.get("input") or "",
             "output": r["output"]} for r in recs]


def reference(records, tok, **kw):
    """data.tokenize on plain records, minus prompt-only examples (what tokenize_file keeps)."""
    ids, labels = D.tokenize(records, tok, **{**KW, **kw})
    keep = [i for i, lab in enumerate(labels) if (lab != D.IGNORE).any()]
    return [ids[i] for i in keep], [labels[i] for i in keep]


def assert_same(data, ref):
    ids, labels = ref
    assert len(data) == len(ids)
    for a, b, la, lb in zip(data.input_ids, ids, data.labels, labels):
        assert a.dtype == np.int32 and la.dtype == np.int32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)


def write(path, records, kind):
    """Write records as a .json list, .jsonl, .parquet or a save_to_disk directory."""
    if kind == "json":
        path.write_text(json.dumps(records))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif kind == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    else:
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "disk", "memory"])
def test_every_source_kind_tokenises_like_data_tokenize(kind, btok, tmp_path):
    recs = shipped("ARC-Challenge", 60) + shipped("boolq", 60)
    src = datasets.Dataset.from_list(recs) if kind == "memory" else \
        write(tmp_path / f"d.{kind}", recs, kind)
    data = D.tokenize_file(src, btok, **KW)
    assert_same(data, reference(recs, btok))
    assert D.load_records(src)[0] == recs


def test_shipped_commonsense_files_are_unchanged_by_the_datasets_path(btok):
    for name in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"):
        data = D.tokenize_file(TRAIN / name / "train.json", btok, limit=300, **KW)
        assert_same(data, reference(shipped(name, 300), btok))
        assert data.files == [str(TRAIN / name / "train.json")]


def _smollm2_converted():
    from moka_jax.models import gguf

    return gguf.is_complete(gguf.smollm2_cache_dir())


@pytest.mark.skipif(not _smollm2_converted(), reason="SmolLM2 not converted yet (models.gguf)")
def test_shipped_data_with_the_smollm2_tokenizer_is_unchanged():
    tok = D.load_tokenizer("smollm2")
    for name in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa"):
        for kw in ({}, {"train_on_inputs": True, "cutoff_len": 64}):
            data = D.tokenize_file(TRAIN / name / "train.json", tok, limit=100, **{**KW, **kw})
            assert_same(data, reference(shipped(name, 100), tok, **kw))


def test_chat_template_goes_through_the_map_unchanged(btok, tmp_path):
    recs = shipped("openbookqa", 40)
    p = write(tmp_path / "c.jsonl", recs, "jsonl")
    assert_same(D.tokenize_file(p, btok, **{**KW, "template": "chat"}),
                reference(recs, btok, template="chat"))


def test_custom_field_names(btok, tmp_path):
    recs = shipped("ARC-Easy", 30)
    mine = [{"question": r["instruction"], "context": r["input"], "response": r["output"],
             "label": r["output"].split()[-1], "id": i} for i, r in enumerate(recs)]
    p = write(tmp_path / "mine.parquet", mine, "parquet")
    fields = C.DataFields(instruction="question", input="context", output="response",
                          answer="label")
    assert_same(D.tokenize_file(p, btok, fields=fields, **KW), reference(recs, btok))
    got, fmt = D.load_records(p, fields=fields)
    assert fmt == "commonsense"   # auto: the mapped answer column is there in every row
    assert got == [{**r, "answer": m["label"]} for r, m in zip(recs, mine)]
    # through the config, as a YAML user writes it
    cfg = C.config_from_dict({"model": {"path": "random", "tokenizer": "bytes"}, "data": {
        "train": [str(p)], "cutoff_len": 1024, "buckets": [1024],
        "fields": {"instruction": "question", "input": "context", "output": "response",
                   "answer": "label"}}})
    train, _ = D.build_datasets(cfg.data, btok)
    assert_same(train, reference(recs, btok))


def test_dataset_in_the_config_and_train_builds_data_before_the_model(btok, tmp_path,
                                                                       monkeypatch):
    from moka_jax.training import loop
    from moka_jax.training.run import train as run_training

    recs = shipped("openbookqa", 40)
    ds = datasets.Dataset.from_list(recs)
    d = {"model": {"path": "random", "tokenizer": "bytes"},
         "data": {"train": [ds, {"path": ds, "limit": 10}], "cutoff_len": 1024,
                  "buckets": [1024]},
         "train": {"steps": 2, "batch_size": 2, "warmup_steps": 0, "out_dir": str(tmp_path / "r")}}
    cfg = C.config_from_dict(d)
    assert cfg.data.train[0].path is ds and cfg.data.train[1].limit == 10
    assert cfg.to_dict()["data"]["train"][0]["path"] == f"<datasets.Dataset {ds._fingerprint}>"
    train, _ = D.build_datasets(cfg.data, btok)
    assert np.bincount(train.source).tolist() == [40, 10]

    built = {}

    def stop(*a, **k):
        built["data"] = True
        raise RuntimeError("model build reached")

    monkeypatch.setattr(loop, "load", stop)
    with pytest.raises(RuntimeError, match="model build reached"):
        run_training(cfg, quiet=True)
    assert built
    bad = datasets.Dataset.from_list([{"instruction": "a", "response": "b"}])
    built.clear()
    with pytest.raises(D.DataError, match=r"Dataset .*: row 0: missing field 'output'.*"
                                          r"data\.fields\.output"):
        run_training(C.config_from_dict({**d, "data": {**d["data"], "train": [bad]}}), quiet=True)
    assert not built   # failed before the model was built (so before anything compiled)


# ----------------------------------------------------------------------------- the cache


def test_second_run_reuses_the_cached_map(btok, tmp_path, cache, monkeypatch):
    calls = []
    real = data_records.tokenize

    def counting(recs, *a, **k):
        calls.append(len(recs))
        return real(recs, *a, **k)

    monkeypatch.setattr(data_records, "tokenize", counting)  # what data.sources calls
    p = write(tmp_path / "a.json", shipped("boolq", 50), "json")
    first = D.tokenize_file(p, btok, **KW)
    assert sum(calls) == 50
    files = sorted((cache / "tokenized").glob("*.arrow"))
    assert len(files) == 1
    calls.clear()
    second = D.tokenize_file(p, btok, **KW)
    assert calls == [] and sorted((cache / "tokenized").glob("*.arrow")) == files
    assert_same(second, (first.input_ids, first.labels))
    # what the rows depend on changes the key: options, fields, limit, the file's contents
    for kw in ({"cutoff_len": 900}, {"train_on_inputs": True}, {"add_eos": False},
               {"template": "llm-adapters"}, {"limit": 20}):
        calls.clear()
        D.tokenize_file(p, btok, **{**KW, **kw})
        assert calls, kw
    calls.clear()
    write(p, shipped("boolq", 51), "json")
    assert len(D.tokenize_file(p, btok, **KW)) == 51 and sum(calls) == 51
    # the same content in a new in-memory Dataset hits the cache too
    calls.clear()
    D.tokenize_file(datasets.Dataset.from_list(shipped("boolq", 30)), btok, **KW)
    D.tokenize_file(datasets.Dataset.from_list(shipped("boolq", 30)), btok, **KW)
    assert calls == [30]
    assert not list((REPO / "data").rglob("*.arrow"))   # never inside the repository's data/


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MOKA_DATA_CACHE")
    monkeypatch.setenv("MOKA_CACHE", str(tmp_path / "m"))
    assert DIO.cache_root() == tmp_path / "m" / "datasets"


# ----------------------------------------------------------------------------- bad data


def test_bad_fields_name_the_source_row_and_fix(btok, tmp_path):
    good = {"instruction": "a", "input": "", "output": "b"}
    p = write(tmp_path / "n.parquet", [good, good, {**good, "output": None}], "parquet")
    with pytest.raises(D.DataError, match=r"n\.parquet: row 2: missing field 'output'"):
        D.tokenize_file(p, btok)
    p = write(tmp_path / "r.jsonl", [{"question": "a", "response": "b"}] * 2, "jsonl")
    with pytest.raises(D.DataError, match=r"r\.jsonl: line 1: missing field 'instruction'.*"
                                          r"fields are \['question', 'response'\].*"
                                          r"set data\.fields\.instruction"):
        D.tokenize_file(p, btok)
    with pytest.raises(D.DataError, match=r"missing field 'ctx'.*data\.fields\.input"):
        D.load_records(p, fields=C.DataFields(instruction="question", output="response",
                                              input="ctx"))
    d = write(tmp_path / "disk", [good, {**good, "instruction": None}], "disk")
    with pytest.raises(D.DataError, match=r"disk: row 1: missing field 'instruction'"):
        D.load_records(d)


def test_wrong_types_and_empty_sources(btok, tmp_path):
    good = {"instruction": "a", "input": "", "output": "b"}
    p = write(tmp_path / "t.parquet", [{**good, "output": 1}], "parquet")
    with pytest.raises(D.DataError, match=r"t\.parquet: row 0: field 'output' is int, expected a string"):
        D.load_records(p)
    p = write(tmp_path / "m.json", [good, good, {**good, "output": ["x"]}], "json")
    with pytest.raises(D.DataError, match=r"m\.json: record 2: field 'output' is list"):
        D.tokenize_file(p, btok)
    p = write(tmp_path / "l.jsonl", [good, {**good, "instruction": 3}], "jsonl")
    with pytest.raises(D.DataError, match=r"l\.jsonl: line 2: field 'instruction' is int"):
        D.tokenize_file(p, btok)
    ds = datasets.Dataset.from_dict({"instruction": [1, 2], "output": ["a", "b"]})
    with pytest.raises(D.DataError, match=r"<datasets\.Dataset \w+>: row 0: field 'instruction' is int"):
        D.tokenize_file(ds, btok)
    with pytest.raises(D.DataError, match=r"Dataset .*: no records"):
        D.tokenize_file(datasets.Dataset.from_list([good]).select([]), btok)
    empty = datasets.Dataset.from_dict({"instruction": [], "output": []})
    empty.to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(D.DataError, match=r"e\.parquet: no records"):
        D.load_records(tmp_path / "e.parquet")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(D.DataError, match=r"e\.jsonl: no records"):
        D.load_records(tmp_path / "e.jsonl")
    with pytest.raises(D.DataError, match=r"\[\]\.json|not.*an object|expected an object"):
        D.load_records(write(tmp_path / "s.json", ["a", "b"], "json"))
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([good])}).save_to_disk(str(dd))
    with pytest.raises(D.DataError, match=r"DatasetDict with splits \['train'\].*dd/train"):
        D.load_records(dd)
    (tmp_path / "plain").mkdir()
    with pytest.raises(D.DataError, match=r"plain: not a directory written by Dataset\.save_to_disk"):
        D.load_records(tmp_path / "plain")


def test_config_checks_fields_and_source_kinds(tmp_path):
    base = {"model": {"path": "random", "tokenizer": "bytes"}}

    def cfg(data):
        return C.config_from_dict({**base, "data": {"train": ["x.json"], **data}})

    assert cfg({}).data.fields == C.DataFields("instruction", "input", "output", "answer")
    assert cfg({"fields": {"output": "response"}}).data.fields.output == "response"
    with pytest.raises(C.ConfigError, match=r"unknown key 'data\.fields\.outptu'.*output"):
        cfg({"fields": {"outptu": "response"}})
    with pytest.raises(C.ConfigError, match=r"data\.fields\.output and data\.fields\.instruction "
                                            r"both read column 'q'"):
        cfg({"fields": {"instruction": "q", "output": "q"}})
    with pytest.raises(C.ConfigError, match=r"data\.fields\.input is empty"):
        cfg({"fields": {"input": ""}})
    with pytest.raises(C.ConfigError, match=r"data\.fields\.answer = 3"):
        cfg({"fields": {"answer": 3}})
    (tmp_path / "a.csv").write_text("instruction,output\na,b\n")
    datasets.Dataset.from_list([{"instruction": "a", "output": "b"}]).save_to_disk(
        str(tmp_path / "disk"))
    c = C.config_from_dict({**base, "data": {"train": [str(tmp_path / "disk")],
                                             "val": [str(tmp_path / "a.csv")]}})
    with pytest.raises(C.ConfigError, match=r"data\.val\[0\]\.path: .*a\.csv.*\.json / \.jsonl / "
                                            r"\.parquet or a Dataset\.save_to_disk directory"):
        C.validate(c)
    C.validate(C.config_from_dict({**base, "data": {"train": [str(tmp_path / "disk")]}}))


def test_run_fingerprint_keeps_the_default_field_mapping_out():
    """A checkpoint written before data.fields existed still resumes; a mapping counts."""
    from moka_jax.training.plan import fingerprint

    d = {"model": {"path": "random", "tokenizer": "bytes"}, "data": {"train": ["x.json"]}}
    assert "fields" not in fingerprint(C.config_from_dict(d))["data"]
    d["data"]["fields"] = {"output": "response"}
    assert fingerprint(C.config_from_dict(d))["data"]["fields"]["output"] == "response"
