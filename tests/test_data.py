"""Data pipeline: records, templates, label masks, buckets, deterministic resumable batches."""

import json
from pathlib import Path

import numpy as np
import pytest

from moka_jax import config as C
from moka_jax import data as D

REPO = Path(__file__).resolve().parents[1]

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


def tokenized(n, seed=0, lo=3, hi=40, files=1, weights=None):
    """TokenizedData of n random-length examples spread over `files` sources."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, n)
    ids = [np.arange(L, dtype=np.int32) + 10 * i for i, L in enumerate(lengths)]
    return D.TokenizedData(ids, [x.copy() for x in ids], np.arange(n) % files,
                           [f"f{k}" for k in range(files)], weights)


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


# ----------------------------------------------------------------------------- batches


def test_batches_are_padded_to_the_smallest_fitting_bucket():
    data = tokenized(300, hi=60)
    buckets = [8, 16, 32, 64]
    it = D.BatchIterator(data, 16, buckets, seed=1, pad_id=0)
    seen = []
    for _ in range(it.steps_per_epoch):
        b = next(it)
        T = b["input_ids"].shape[1]
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape == (16, T) and T in buckets
        assert T == min(x for x in buckets if x >= lengths.max())
        assert all(v.dtype == np.int32 for v in b.values())
        pos = np.arange(T)
        assert ((pos < lengths[:, None]) == (b["attention_mask"] == 1)).all()  # right padding
        assert (b["labels"][b["attention_mask"] == 0] == D.IGNORE).all()
        seen += [int(r[0]) // 10 for r in b["input_ids"]]
    assert len(seen) == len(set(seen)) and len(data) - len(seen) < 16  # < one batch dropped


def test_shuffle_is_deterministic_and_seeded():
    data = tokenized(200)
    def first(seed, n=20):
        it = D.BatchIterator(data, 8, [16, 32, 64], seed=seed)
        return [next(it)["input_ids"] for _ in range(n)]
    a, b, c = first(3), first(3), first(4)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all(x.shape == y.shape and (x == y).all() for x, y in zip(a, c))


def test_state_restore_yields_identical_batches():
    data = tokenized(100)
    it = D.BatchIterator(data, 8, [16, 32, 64], seed=7)
    n = it.steps_per_epoch
    for _ in range(n - 2):
        next(it)
    state = it.state()
    assert state == {"epoch": 0, "position": n - 2, "seed": 7}
    expected = [next(it) for _ in range(n + 3)]  # crosses into epochs 1 and 2
    assert it.state()["epoch"] >= 1
    resumed = D.BatchIterator(data, 8, [16, 32, 64], seed=7)
    resumed.restore(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for e in expected:
        got = next(resumed)
        assert all((got[k] == e[k]).all() for k in e)
    with pytest.raises(D.DataError, match="seed"):
        resumed.restore({**state, "seed": 8})


def test_process_shards_make_the_global_batch():
    data = tokenized(64)
    full = next(D.BatchIterator(data, 8, [16, 32, 64], seed=0))
    parts = [next(D.BatchIterator(data, 8, [16, 32, 64], seed=0, process_index=i, process_count=2))
             for i in range(2)]
    assert all((np.concatenate([p[k] for p in parts]) == full[k]).all() for k in full)


def test_weighted_mixing_follows_weights():
    data = tokenized(400, files=2, weights=[3.0, 1.0])   # 200 examples per file
    it = D.BatchIterator(data, 8, [16, 32, 64], seed=0)
    idx = np.array([i for _, rows in it.plan(0) for r in rows for i in r])
    counts = np.bincount(data.source[idx], minlength=2)
    assert abs(counts[0] / counts.sum() - 0.75) < 0.03     # file 0 repeated, file 1 subsampled


def test_eval_batches_cover_every_example_once():
    data = tokenized(45)
    rows = []
    for b in D.eval_batches(data, 8, [16, 32, 64]):
        assert b["input_ids"].shape[0] == 8
        rows += [int(r[0]) // 10 for r, m in zip(b["input_ids"], b["attention_mask"]) if m.any()]
    assert sorted(rows) == list(range(45))


# ----------------------------------------------------------------------------- packing


def _examples_in(batch):
    """{example id: its tokens} read back from packed rows via segment ids."""
    out = {}
    for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
        for s in range(1, seg.max() + 1):
            toks = ids[seg == s]
            out[int(toks[0]) // 10] = toks
    return out


def test_packed_epoch_holds_every_example_once_in_rows_that_fit():
    data = tokenized(300, hi=60)
    it = D.BatchIterator(data, 4, [16, 32, 64], seed=1, packing=True)
    seen, real = [], 0
    for _ in range(it.steps_per_epoch):
        b = next(it)
        assert b["input_ids"].shape == (4, 64)               # one shape: the largest bucket
        got = _examples_in(b)
        for i, toks in got.items():                          # each example intact, in one row
            assert (toks == data.input_ids[i]).all()
        seg, pos = b["segment_ids"], b["positions"]
        for r in range(4):                                   # positions restart per example
            for s in range(1, seg[r].max() + 1):
                assert (pos[r][seg[r] == s] == np.arange((seg[r] == s).sum())).all()
        assert ((seg > 0) == (b["attention_mask"] == 1)).all()
        seen += list(got)
        real += int(b["attention_mask"].sum())
    assert sorted(seen) == list(range(300))                  # nothing dropped, nothing twice
    assert it.epoch == 0 and real == int(data.lengths.sum())
    assert real / (it.steps_per_epoch * 4 * 64) > 0.85       # little padding left


def test_packed_batches_are_deterministic_and_resume_exactly():
    data = tokenized(200, hi=60)
    it = D.BatchIterator(data, 4, [64], seed=3, packing=True)
    for _ in range(5):
        next(it)
    state = it.state()
    expected = [next(it) for _ in range(it.steps_per_epoch + 2)]   # crosses an epoch
    again = D.BatchIterator(data, 4, [64], seed=3, packing=True)
    again.restore(json.loads(json.dumps(state)))
    for e in expected:
        got = next(again)
        assert all((got[k] == e[k]).all() for k in e)


def test_label_slots_are_the_next_token_targets_within_each_example():
    data = tokenized(60, hi=30)
    data.labels = [np.where(np.arange(len(x)) < len(x) // 2, D.IGNORE, x).astype(np.int32)
                   for x in data.input_ids]              # prompt half unlabelled
    b = next(D.BatchIterator(data, 3, [64], seed=0, packing=True))
    tgt = D.next_token_targets(b["labels"], b["segment_ids"])
    for r in range(3):
        for t in range(63):
            same = b["segment_ids"][r, t] > 0 and b["segment_ids"][r, t + 1] == b["segment_ids"][r, t]
            assert tgt[r, t] == (b["labels"][r, t + 1] if same else D.IGNORE)
    pos, lab = b["loss_pos"], b["loss_tgt"]
    for r in range(3):
        n = int((tgt[r] != D.IGNORE).sum())
        assert (lab[r, :n] == tgt[r, pos[r, :n]]).all() and (lab[r, n:] == D.IGNORE).all()
    with pytest.raises(D.DataError, match="over the capacity 2"):
        D.label_slots(b, 2)


def test_label_capacity_rises_instead_of_dropping_a_label():
    data = tokenized(40, hi=20)
    it = D.BatchIterator(data, 2, [64], seed=0, packing=True)
    T = 64
    it.capacity[T] = 1                       # as if the first epochs' plans were all tiny
    b = next(it)
    assert it.capacity[T] >= int(D.labelled_per_row(b).max())
    assert ((b["loss_tgt"] != D.IGNORE).sum(1) == D.labelled_per_row(b)).all()


def test_unpacked_rows_hold_one_example_and_match_collate():
    data = tokenized(64)
    b = next(D.BatchIterator(data, 8, [16, 32, 64], seed=0))
    assert (b["segment_ids"] == b["attention_mask"]).all()
    T = b["input_ids"].shape[1]
    assert (b["positions"] == np.where(b["attention_mask"] == 1, np.arange(T), 0)).all()


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
    it = D.BatchIterator(train, cfg.train.batch_size, cfg.data.buckets, seed=cfg.data.seed,
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
