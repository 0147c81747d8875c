"""data.heldout: the tail of a file is held out only when training stops before it."""

import json

import pytest

from moka_jax.config import DataConfig, DataFile
from moka_jax.data import DataError, load_records
from moka_jax.data.heldout import heldout_records


@pytest.fixture()
def records_file(tmp_path):
    recs = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(10)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recs))
    return path, recs


def _data_cfg(tmp_path, train):
    return DataConfig(train=[DataFile(**t) for t in train])


def test_the_tail_is_what_training_never_reads(records_file, tmp_path):
    path, recs = records_file
    cfg = _data_cfg(tmp_path, [{"path": str(path), "limit": 7}])
    held = heldout_records(cfg, path, 3)
    assert held == [{**r} for r in recs[7:]]
    trained, _ = load_records(path, limit=7)            # what the trainer reads of the file
    assert not {r["instruction"] for r in trained} & {r["instruction"] for r in held}


@pytest.mark.parametrize("train, n, match", [
    ([{"limit": 8}], 3, "first 8 .* limit <= 7"),
    ([{}], 3, "reads all"),
    ([{"limit": 5}], 10, "cannot hold out 10"),
])
def test_overlap_with_training_is_refused(records_file, tmp_path, train, n, match):
    path, _ = records_file
    cfg = _data_cfg(tmp_path, [{"path": str(path), **t} for t in train])
    with pytest.raises(DataError, match=match):
        heldout_records(cfg, path, n)
