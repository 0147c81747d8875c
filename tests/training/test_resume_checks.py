"""A resume continues only the run it belongs to: the same data (by content), and checkpoint
metadata that agrees with itself. One table per mechanism; the plan runs, no weight loads."""

import json

import jax.numpy as jnp
import optax
import pytest

from moka_jax.config import config_from_dict
from moka_jax.data.records import DataError
from moka_jax.support import outputs
from moka_jax.support.trees import CheckpointError
from moka_jax.training.checkpoint import TrainCheckpointer, read_step_meta
from tests.training.test_train import REPO, tiny

OBQA = REPO / "data/commonsense_train/openbookqa/train.json"


def records(n):
    return json.loads(OBQA.read_text())[:n]


def cut_to_20(path):            # the case: 200 -> 50 records between runs
    path.write_text(json.dumps(records(20)))


def edit_one_answer(path):
    recs = records(32)
    recs[5]["output"] = "the other answer"
    path.write_text(json.dumps(recs))


def rewrite_same_bytes(path):   # a copy or a touch: same content, new mtime
    path.write_bytes(path.read_bytes())


# (what happens to the data file after step 4, train.allow_data_change, a regex of the refusal
#  or None when the plan resumes)
DATA_CASES = [
    (cut_to_20, False, r"trained to step 4 on other data: data.train\[0\] \(.*train.json\) "
                       r"changed: sha256 \w{12} -> \w{12}\. Resuming would continue on different "
                       r"data.* set train.allow_data_change=true"),
    (edit_one_answer, False, r"data.train\[0\] .* changed"),
    (rewrite_same_bytes, False, None),
    (cut_to_20, True, None),
]


@pytest.fixture
def checkpointed(tmp_path, monkeypatch):
    """A run at step 4 (a real checkpoint of a stand-in adapter) on a 32-record copy of OBQA;
    the plan loads no weights."""
    from moka_jax.data.identity import data_identity
    from moka_jax.data.records import load_tokenizer
    from moka_jax.training import plan

    data = tmp_path / "train.json"
    data.write_text(json.dumps(records(32)))
    d = tiny(tmp_path / "run")
    d["data"]["train"][0] = {"path": str(data)}
    cfg = config_from_dict(d)
    run = plan.run_dir(cfg)
    ck = TrainCheckpointer(run, plan.fingerprint(cfg))
    p = {"a": jnp.ones(3)}
    ck.save(4, p, optax.adam(1e-3).init(p), {"epoch": 0, "position": 4, "seed": cfg.data.seed},
            {"inputs": data_identity(cfg.data, load_tokenizer("bytes"))})
    ck.close()
    outputs.write_marker(run, "train", owner=plan.fingerprint(cfg))
    return d, data


@pytest.mark.parametrize("change,allow,want", DATA_CASES)
def test_resume_on_changed_data(checkpointed, capsys, change, allow, want):
    from moka_jax.training.plan import plan_run

    d, data = checkpointed
    change(data)
    d["train"]["allow_data_change"] = allow
    if want is not None:
        with pytest.raises(DataError, match=want) as e:
            plan_run(config_from_dict(d), 1, quiet=True)
        assert "\n" not in str(e.value)
        return
    plan = plan_run(config_from_dict(d), 1, quiet=True)
    plan.release()
    assert plan.resume_step == 4
    if allow:
        assert plan.data_changes == [{"step": 4, "changes": [
            f"data.train[0] ({data}) changed: sha256 "
            f"{plan.data_changes[0]['changes'][0].split('sha256 ')[1]}"]}]
        assert "resuming step 4 on changed data (train.allow_data_change)" in \
            capsys.readouterr().out
    else:
        assert plan.data_changes is None


# ---- checkpoint metadata -----------------------------------------------------------------
GOOD = {"step": 10, "data": {"epoch": 0, "position": 10, "seed": 42}, "fingerprint": {},
        "tree": {}}
# (a change to a step-10 checkpoint's metadata, a regex of the refusal or None)
META_CASES = [
    ({}, None),
    ({"step": 12}, r"step 12 is not this checkpoint's step \(10\)"),
    ({"step": "10"}, r"step '10' is not this checkpoint's step"),
    ({"step": True}, r"step True is not"),
    ({"data": [0, 10]}, r"data is list, not a mapping"),
    ({"fingerprint": None}, r"fingerprint is NoneType, not a mapping"),
]


@pytest.mark.parametrize("change,want", META_CASES)
def test_checkpoint_metadata_agrees_with_itself(tmp_path, change, want):
    meta_file = tmp_path / "10" / "meta" / "metadata"
    meta_file.parent.mkdir(parents=True)
    meta_file.write_text(json.dumps({**GOOD, **change}))
    if want is None:
        assert read_step_meta(tmp_path / "10")["step"] == 10
    else:
        with pytest.raises(CheckpointError, match=want):
            read_step_meta(tmp_path / "10")


def batches():
    from moka_jax.data.batching import BatchIterator
    from tests.data.test_batching import tokenized

    it = BatchIterator(tokenized(8, hi=16), 2, [16], seed=42)
    assert it.steps_per_epoch == 4
    return it


# (data state, the checkpoint's step or None after an accepted data change, refusal or None)
POSITION_CASES = [
    ({"epoch": 0, "position": 3, "seed": 42}, 3, None),
    ({"epoch": 2, "position": 1, "seed": 42}, 9, None),
    ({"epoch": 0, "position": 4, "seed": 42}, 4, None),           # the end of epoch 0
    ({"epoch": 0, "position": 3, "seed": 42}, 5, r"has served 3 batches, but its checkpoint is "
                                                 r"at step 5"),
    ({"epoch": 0, "position": 9, "seed": 42}, 9, r"position 9 of 4"),
    ({"epoch": -1, "position": 0, "seed": 42}, 0, r"negative"),
    ({"epoch": 0, "position": "x", "seed": 42}, 0, r"damaged"),
    ({"epoch": 0, "seed": 42}, 0, r"damaged"),
    ({"epoch": 0, "position": 1, "seed": 7}, 1, r"seed 7, this iterator 42"),
    ({"epoch": 0, "position": 9, "seed": 42}, None, None),        # data changed: next epoch
]


@pytest.mark.parametrize("state,step,want", POSITION_CASES)
def test_data_position_agrees_with_the_step(state, step, want):
    it = batches()
    if want is not None:
        with pytest.raises(DataError, match=want):
            it.restore(state, step)
        return
    it.restore(state, step)
    next(it)  # the restored position serves a batch
