"""Data pipeline: records, templates, label masks, files to the first batch (batching's own
tests are tests/test_batching.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from moka_jax import config as C
from moka_jax import data as D
from moka_jax.data.batching import BatchIterator

REPO = Path(__file__).resolve().parents[2]

RECORD = {"instruction": "Name a color.", "input": "", "output": "Blue is a color."}
RECORD_IN = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}


def words_tokenizer():
    """A tiny local word-level tokenizer (no hub) that prepends <s>, like LLaMA's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [D.render(r)[1] for r in (RECORD, RECORD_IN)] + ["question answer true false"]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def wtok():
    return words_tokenizer()


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def records(n, prefix="q", words=1):
    return [{"instruction": f"{prefix} {i} " + "question " * words, "input": "",
             "output": "answer " * (1 + i % 5)} for i in range(n)]


# ----------------------------------------------------------------------------- templates


def test_alpaca_template_text():
    prompt, full = D.render(RECORD)
    assert full == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\n"
        "Blue is a color.")
    assert full == prompt + RECORD["output"]
    _, full = D.render(RECORD_IN)
    assert full == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
        "The sum is 5.")


def test_llm_adapters_template_is_their_finetune_string():
    ind = " " * 16
    _, full = D.render(RECORD, "llm-adapters")
    assert full == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.  \n\n{ind}### Instruction:\n{ind}Name a color.\n{ind}\n"
        f"{ind}### Response:\n{ind}Blue is a color.")
    _, full = D.render(RECORD_IN, "llm-adapters")
    assert full.startswith("Below is an instruction that describes a task, paired with an input "
                           "that provides further context. Write a response that appropriately "
                           "completes the request. \n\n")
    assert f"{ind}### Input:\n{ind}2 and 3\n{ind}\n{ind}### Response:\n{ind}The sum" in full


def test_chat_template_with_byte_tokenizer():
    tok = D.byte_tokenizer()
    ((prompt, full),) = D.render_chat([RECORD_IN], tok)
    assert prompt == "<s>user\nAdd the numbers.\n\n2 and 3</s>\n<s>assistant\n"
    assert full == prompt + "The sum is 5.</s>\n"
    (ids,), (labels,) = D.tokenize([RECORD_IN], tok, template="chat", cutoff_len=512)
    assert tok.decode(ids[labels != D.IGNORE]) == "The sum is 5.</s>\n"  # no second EOS
    assert (labels[:len(tok(prompt, add_special_tokens=False)["input_ids"])] == D.IGNORE).all()


# ----------------------------------------------------------------------------- records


def test_load_records_formats(tmp_path):
    recs, fmt = D.load_records(REPO / "data/commonsense/boolq/dev.json")
    assert fmt == "commonsense" and len(recs) == 200 and set(recs[0]) >= {"answer", "output"}
    recs, fmt = D.load_records(REPO / "data/instruct/dolly_open_qa/train.json", limit=7)
    assert fmt == "alpaca" and len(recs) == 7
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [RECORD, {"instruction": "x", "output": "y"}]))
    recs, fmt = D.load_records(jsonl)
    assert fmt == "alpaca" and recs[1] == {"instruction": "x", "input": "", "output": "y"}


def test_missing_field_names_file_index_and_field(tmp_path):
    bad = write_json(tmp_path / "bad.json", [RECORD, RECORD, {"instruction": "x", "input": ""}])
    with pytest.raises(D.DataError, match=r"bad\.json: record 2: missing field 'output'"):
        D.load_records(bad)
    bad = write_json(tmp_path / "cs.json", [{**RECORD, "answer": "a"}, RECORD])
    with pytest.raises(D.DataError, match=r"cs\.json: record 1: missing field 'answer'"):
        D.load_records(bad, "commonsense")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps(RECORD) + "\n\n" + json.dumps({"output": "y"}) + "\n")
    with pytest.raises(D.DataError, match=r"b\.jsonl: line 3: missing field 'instruction'"):
        D.load_records(jsonl)
    bad = write_json(tmp_path / "t.json", [{**RECORD, "output": 3}])
    with pytest.raises(D.DataError, match=r"record 0: field 'output' is int"):
        D.load_records(bad)


def test_unparseable_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": oops}\n]')
    with pytest.raises(D.DataError, match=r"broken\.json:3:\d+: invalid JSON"):
        D.load_records(p)
    p = tmp_path / "broken.jsonl"
    p.write_text(json.dumps(RECORD) + "\n{nope\n")
    with pytest.raises(D.DataError, match=r"broken\.jsonl:2:\d+: invalid JSON"):
        D.load_records(p)
    empty = write_json(tmp_path / "empty.json", [])
    with pytest.raises(D.DataError, match="empty.json: no records"):
        D.load_records(empty)


# ----------------------------------------------------------------------------- labels


def test_labels_mask_exactly_the_prompt_tokens(wtok):
    for rec in (RECORD, RECORD_IN):
        prompt, full = D.render(rec)
        (ids,), (labels,) = D.tokenize([rec], wtok, cutoff_len=256)
        n_prompt = len(wtok(prompt)["input_ids"])  # includes <s>
        full_ids = wtok(full)["input_ids"]
        assert ids.dtype == np.int32 and list(ids) == full_ids + [wtok.eos_token_id]
        assert (labels[:n_prompt] == D.IGNORE).all()
        assert list(labels[n_prompt:]) == full_ids[n_prompt:] + [wtok.eos_token_id]
        assert wtok.decode(labels[n_prompt:-1]) == rec["output"].replace(".", " .")
        (ids2,), (labels2,) = D.tokenize([rec], wtok, train_on_inputs=True)
        assert (labels2 == ids2).all()


def test_cutoff_truncates_without_eos_and_drops_prompt_only(wtok, tmp_path):
    full_len = len(wtok(D.render(RECORD)[1])["input_ids"])
    (ids,), (labels,) = D.tokenize([RECORD], wtok, cutoff_len=full_len)
    assert len(ids) == full_len and ids[-1] != wtok.eos_token_id   # as LLM-Adapters: no room
    (ids,), _ = D.tokenize([RECORD], wtok, cutoff_len=full_len + 1)
    assert ids[-1] == wtok.eos_token_id
    (ids,), _ = D.tokenize([RECORD], wtok, add_eos=False)
    assert ids[-1] != wtok.eos_token_id
    p = write_json(tmp_path / "long.json", [RECORD, RECORD_IN])
    n_prompt = len(wtok(D.render(RECORD)[0])["input_ids"])
    with pytest.raises(D.DataError, match=r"long\.json: all 2 examples removed.*cutoff_len = 5"):
        D.tokenize_file(p, wtok, cutoff_len=5)
    d = D.tokenize_file(p, wtok, cutoff_len=n_prompt + 1)  # RECORD_IN's prompt is longer
    assert len(d) == 1 and (d.labels[0] != D.IGNORE).sum() == 1


# ----------------------------------------------------------------------------- files -> batches


def data_config(tmp_path, train, **kw):
    d = {"model": {"path": "random", "tokenizer": "bytes"},
         "data": {"train": train, "cutoff_len": 256, "buckets": [64, 128, 256], **kw}}
    return C.config_from_dict(d).data


def test_build_datasets_respects_limits_and_val_split(wtok, tmp_path):
    a = write_json(tmp_path / "a.json", records(30, "a"))
    b = write_json(tmp_path / "b.json", records(20, "b"))
    cfg = data_config(tmp_path, [{"path": str(a), "limit": 12}, {"path": str(b), "limit": 5}])
    train, val = D.build_datasets(cfg, wtok)
    assert val is None and np.bincount(train.source).tolist() == [12, 5]
    assert train.files == [str(a), str(b)] and train.weights is None
    cfg = data_config(tmp_path, [str(a), str(b)], val_size=10, val=[str(b)])
    train, val = D.build_datasets(cfg, wtok)
    assert len(train) == 40 and len(val) == 10 + 20
    with pytest.raises(D.DataError, match="val_size"):
        D.build_datasets(data_config(tmp_path, [str(b)], val_size=20), wtok)


def test_tiny_debug_pipeline_end_to_end():
    cfg = C.load_config(REPO / "configs/tiny-debug.yaml")
    tok = D.load_tokenizer(cfg.model.tokenizer)
    assert len(tok) == cfg.model.tiny.vocab
    train, val = D.build_datasets(cfg.data, tok)
    assert len(val) == cfg.data.val_size and np.bincount(train.source).sum() == len(train)
    it = BatchIterator(train, cfg.train.batch_size, cfg.data.buckets, seed=cfg.data.seed,
                       pad_id=D.pad_id(tok))
    b = next(it)
    assert b["input_ids"].shape[0] == cfg.train.batch_size
    assert b["input_ids"].shape[1] in cfg.data.buckets
    text = tok.decode(b["input_ids"][0][b["attention_mask"][0] == 1])
    assert text.startswith("Below is an instruction") and text.endswith("</s>")


def _smollm2_converted():
    from moka_jax.models import gguf

    return gguf.is_complete(gguf.smollm2_cache_dir())


@pytest.mark.skipif(not _smollm2_converted(), reason="SmolLM2 not converted yet (models.gguf)")
def test_smollm2_masks_match_llm_adapters_prompt_lengths():
    """With the real BPE tokenizer, the offset mask equals LLM-Adapters' len(tokenize(prompt))."""
    tok = D.load_tokenizer("smollm2")
    recs = []
    for task in ("boolq", "ARC-Challenge", "hellaswag"):
        recs += D.load_records(REPO / f"data/commonsense/{task}/dev.json", limit=50)[0]
    ids, labels = D.tokenize(recs, tok, cutoff_len=1024)
    for r, x, lab in zip(recs, ids, labels):
        prompt, full = D.render(r)
        n = len(tok(prompt)["input_ids"])
        assert list(x[:-1]) == tok(full)["input_ids"] and x[-1] == tok.eos_token_id
        assert (lab[:n] == D.IGNORE).all() and (lab[n:] == x[n:]).all()
