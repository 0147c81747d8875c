"""Batching: buckets, packing, label slots, deterministic resumable batches."""

import json

import numpy as np
import pytest

from moka_jax.data import batching as B
from moka_jax import data as D


def tokenized(n, seed=0, lo=3, hi=40, files=1, weights=None):
    """TokenizedData of n random-length examples spread over `files` sources."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi, n)
    ids = [np.arange(L, dtype=np.int32) + 10 * i for i, L in enumerate(lengths)]
    return D.TokenizedData(ids, [x.copy() for x in ids], np.arange(n) % files,
                           [f"f{k}" for k in range(files)], weights)


# ----------------------------------------------------------------------------- batches


def test_batches_are_padded_to_the_smallest_fitting_bucket():
    data = tokenized(300, hi=60)
    buckets = [8, 16, 32, 64]
    it = B.BatchIterator(data, 16, buckets, seed=1, pad_id=0)
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
        it = B.BatchIterator(data, 8, [16, 32, 64], seed=seed)
        return [next(it)["input_ids"] for _ in range(n)]
    a, b, c = first(3), first(3), first(4)
    assert all((x == y).all() for x, y in zip(a, b))
    assert not all(x.shape == y.shape and (x == y).all() for x, y in zip(a, c))


def test_state_restore_yields_identical_batches():
    data = tokenized(100)
    it = B.BatchIterator(data, 8, [16, 32, 64], seed=7)
    n = it.steps_per_epoch
    for _ in range(n - 2):
        next(it)
    state = it.state()
    assert state == {"epoch": 0, "position": n - 2, "seed": 7}
    expected = [next(it) for _ in range(n + 3)]  # crosses into epochs 1 and 2
    assert it.state()["epoch"] >= 1
    resumed = B.BatchIterator(data, 8, [16, 32, 64], seed=7)
    resumed.restore(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    for e in expected:
        got = next(resumed)
        assert all((got[k] == e[k]).all() for k in e)
    with pytest.raises(D.DataError, match="seed"):
        resumed.restore({**state, "seed": 8})


def test_process_shards_make_the_global_batch():
    data = tokenized(64)
    full = next(B.BatchIterator(data, 8, [16, 32, 64], seed=0))
    parts = [next(B.BatchIterator(data, 8, [16, 32, 64], seed=0, process_index=i, process_count=2))
             for i in range(2)]
    assert all((np.concatenate([p[k] for p in parts]) == full[k]).all() for k in full)


def test_weighted_mixing_follows_weights():
    data = tokenized(400, files=2, weights=[3.0, 1.0])   # 200 examples per file
    it = B.BatchIterator(data, 8, [16, 32, 64], seed=0)
    idx = np.array([i for _, rows in it.plan(0) for r in rows for i in r])
    counts = np.bincount(data.source[idx], minlength=2)
    assert abs(counts[0] / counts.sum() - 0.75) < 0.03     # file 0 repeated, file 1 subsampled


def test_eval_batches_cover_every_example_once():
    data = tokenized(45)
    rows = []
    for b in B.eval_batches(data, 8, [16, 32, 64]):
        assert b["input_ids"].shape[0] == 8
        rows += [int(r[0]) // 10 for r, m in zip(b["input_ids"], b["attention_mask"]) if m.any()]
    assert sorted(rows) == list(range(45))


def test_packed_eval_batches_cover_every_example_once_in_fewer_rows():
    data = tokenized(45)
    data.labels = [np.where(np.arange(len(x)) < len(x) // 2, D.IGNORE, x).astype(np.int32)
                   for x in data.input_ids]
    unpacked = list(B.eval_batches(data, 4, [16, 32, 64]))
    packed = list(B.eval_batches(data, 4, [16, 32, 64], packing=True))
    assert len(packed) < len(unpacked) / 2
    got = {}
    for b in packed:
        assert b["input_ids"].shape == (4, 64)
        assert b["loss_pos"].shape == packed[0]["loss_pos"].shape      # one compiled shape
        got.update(_examples_in(b))
    assert sorted(got) == list(range(45))
    assert all((got[i] == data.input_ids[i]).all() for i in got)
    # every next-token target once: the same scored tokens as the unpacked pass
    scored = lambda bs: sorted(int(t) for b in bs for t in b["loss_tgt"].ravel() if t != D.IGNORE)
    assert scored(packed) == scored(unpacked)


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
    it = B.BatchIterator(data, 4, [16, 32, 64], seed=1, packing=True)
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
    it = B.BatchIterator(data, 4, [64], seed=3, packing=True)
    for _ in range(5):
        next(it)
    state = it.state()
    expected = [next(it) for _ in range(it.steps_per_epoch + 2)]   # crosses an epoch
    again = B.BatchIterator(data, 4, [64], seed=3, packing=True)
    again.restore(json.loads(json.dumps(state)))
    for e in expected:
        got = next(again)
        assert all((got[k] == e[k]).all() for k in e)


def test_label_slots_are_the_next_token_targets_within_each_example():
    data = tokenized(60, hi=30)
    data.labels = [np.where(np.arange(len(x)) < len(x) // 2, D.IGNORE, x).astype(np.int32)
                   for x in data.input_ids]              # prompt half unlabelled
    b = next(B.BatchIterator(data, 3, [64], seed=0, packing=True))
    tgt = B.next_token_targets(b["labels"], b["segment_ids"])
    for r in range(3):
        for t in range(63):
            same = b["segment_ids"][r, t] > 0 and b["segment_ids"][r, t + 1] == b["segment_ids"][r, t]
            assert tgt[r, t] == (b["labels"][r, t + 1] if same else D.IGNORE)
    pos, lab = b["loss_pos"], b["loss_tgt"]
    for r in range(3):
        n = int((tgt[r] != D.IGNORE).sum())
        assert (lab[r, :n] == tgt[r, pos[r, :n]]).all() and (lab[r, n:] == D.IGNORE).all()
    with pytest.raises(D.DataError, match="over the capacity 2"):
        B.label_slots(b, 2)


def test_label_capacity_rises_instead_of_dropping_a_label():
    data = tokenized(40, hi=20)
    it = B.BatchIterator(data, 2, [64], seed=0, packing=True)
    T = 64
    it.capacity[T] = 1                       # as if the first epochs' plans were all tiny
    b = next(it)
    assert it.capacity[T] >= int(B.labelled_per_row(b).max())
    assert ((b["loss_tgt"] != D.IGNORE).sum(1) == B.labelled_per_row(b)).all()


def test_unpacked_rows_hold_one_example_and_match_collate():
    data = tokenized(64)
    b = next(B.BatchIterator(data, 8, [16, 32, 64], seed=0))
    assert (b["segment_ids"] == b["attention_mask"]).all()
    T = b["input_ids"].shape[1]
    assert (b["positions"] == np.where(b["attention_mask"] == 1, np.arange(T), 0)).all()
