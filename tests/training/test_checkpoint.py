"""Checkpoint fallback: each part of a step damaged in turn; restore says which step, which file
and why in one line, restores the newest intact step, deletes nothing, and stays quiet
(no "Event loop is closed" tracebacks)."""

import glob
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moka_jax.training.checkpoint import (CheckpointError, TrainCheckpointer, newest_intact,
                                       verify_step)

PARAMS = {"a": jnp.ones((4, 3)), "b": {"c": jnp.arange(5.0)}}


def blobs(step_dir: Path) -> list[str]:
    return sorted(glob.glob(f"{step_dir}/state/d/*"))


def truncate_blobs(step_dir):
    for f in blobs(step_dir):
        os.truncate(f, os.path.getsize(f) // 2)


DAMAGE = {
    "meta removed": (lambda d: shutil.rmtree(d / "meta"), r"meta/metadata: .*not found"),
    "meta random bytes": (lambda d: (d / "meta" / "metadata").write_bytes(os.urandom(64)),
                          r"meta/metadata: .*not UTF-8"),
    "meta truncated": (lambda d: os.truncate(d / "meta" / "metadata", 10),
                       r"meta/metadata: .*not valid JSON"),
    "manifest removed": (lambda d: os.remove(d / "state" / "manifest.ocdbt"),
                         r"state/manifest.ocdbt: missing"),
    "state blob removed": (lambda d: os.remove(blobs(d)[0]), r"state/d/\w+: NOT_FOUND"),
    "state blobs truncated": (truncate_blobs, r"state/d/\w+: OUT_OF_RANGE"),
    "orbax metadata garbled": (lambda d: (d / "state" / "_METADATA").write_text("{oops"),
                               r"state"),  # found by orbax itself, after verify
}


@pytest.fixture
def run(tmp_path):
    opt = optax.adam(1e-3).init(PARAMS)
    ck = TrainCheckpointer(tmp_path, {"x": 1}, keep_last=3)
    for s in (1, 2):
        ck.save(s, jax.tree.map(lambda x: x * s, PARAMS), opt, {"epoch": 0, "position": s, "seed": 0})
    ck.close()
    return tmp_path, opt


def test_intact_steps_verify(run):
    out, _ = run
    assert verify_step(out / "checkpoints" / "2") is None
    assert newest_intact(out / "checkpoints") == (2, [])


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_latest_step_falls_back(run, name, capfd):
    out, opt = run
    damage, cause = DAMAGE[name]
    step2 = out / "checkpoints" / "2"
    damage(step2)
    files_before = sorted(str(p.relative_to(step2)) for p in step2.rglob("*"))
    ck = TrainCheckpointer(out, {"x": 1}, keep_last=3)
    lines = []
    params, _, meta = ck.restore(PARAMS, opt, log=lines.append)
    ck.close()
    assert meta["step"] == 1 and np.array_equal(params["b"]["c"], np.arange(5.0))
    assert len(lines) == 1, lines
    import re
    assert re.search(rf"checkpoint step 2 is damaged \({cause}", lines[0]), lines[0]
    assert "restoring step 1" in lines[0] and "checkpoints.damaged/2" in lines[0]
    # Nothing deleted: the damaged step is kept, whole, out of orbax's way.
    kept = out / "checkpoints.damaged" / "2"
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == files_before
    assert ck.steps() == [1]
    assert "Event loop is closed" not in capfd.readouterr().err


def test_every_step_damaged_is_one_clear_error(run, capfd):
    out, opt = run
    for s in (1, 2):
        os.remove(out / "checkpoints" / str(s) / "state" / "manifest.ocdbt")
    ck = TrainCheckpointer(out, {"x": 1}, keep_last=3)
    with pytest.raises(CheckpointError, match=r"(?s)no intact checkpoint.*nothing was deleted.*"
                                              r"step 2: state/manifest.ocdbt: missing.*"
                                              r"step 1: state/manifest.ocdbt: missing.*"
                                              r"train.overwrite=true"):
        ck.restore(PARAMS, opt)
    ck.close()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]
    assert "Event loop is closed" not in capfd.readouterr().err


def test_fingerprint_read_past_a_damaged_step(run):
    out, _ = run
    shutil.rmtree(out / "checkpoints" / "2" / "meta")
    TrainCheckpointer(out, {"x": 1}).check_same_run()  # step 1 says: same run
    with pytest.raises(CheckpointError, match=r"(?s)another run \(step 1\).*x: checkpoint 1 vs config 2"):
        TrainCheckpointer(out, {"x": 2}).check_same_run()
