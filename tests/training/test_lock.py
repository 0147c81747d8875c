"""One owner per run directory: a table of lock files -> taken, or refused naming the owner."""

import json
import os
import socket
import subprocess
import time

import pytest
import yaml

from moka_jax.training.lock import LOCK, RunLock, RunLocked, read_lock


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


HOST = socket.gethostname()
# (what the lock file holds, or None for no file; a regex of the refusal, or "taken" / the note)
CASES = [
    (None, "taken"),
    (lambda: {"pid": os.getpid(), "host": HOST, "started": 0}, "taken"),   # this process again
    (lambda: {"pid": dead_pid(), "host": HOST, "started": 0}, "note: taking over the lock of a "
     r"run that is gone \(pid \d+ on "),
    (lambda: {"pid": os.getppid(), "host": HOST, "started": 0},
     r"in use by another run \(pid \d+ on .*, started 1970-01-01 00:00:00 UTC\); wait for it"),
    (lambda: {"pid": 1, "host": "elsewhere", "started": 0},
     r"another run \(pid 1 on elsewhere.*; if that run is gone, delete .*" + LOCK),
    (lambda: "{not json", r"locked by .*, which is unreadable; if no run is using"),
]


@pytest.mark.parametrize("held,want", CASES)
def test_lock(tmp_path, held, want):
    if held is not None:
        value = held()
        (tmp_path / LOCK).write_text(value if isinstance(value, str) else json.dumps(value))
    notes = []
    if want == "taken" or want.startswith("note: "):
        lock = RunLock.acquire(tmp_path, note=notes.append)
        if want.startswith("note: "):
            assert len(notes) == 1 and __import__("re").search(want[6:], notes[0]), notes
            assert read_lock(tmp_path)["pid"] == os.getpid()
        lock.release()
        assert held is not None or not (tmp_path / LOCK).exists()
    else:
        before = (tmp_path / LOCK).read_text()
        with pytest.raises(RunLocked, match=want) as e:
            RunLock.acquire(tmp_path, note=notes.append)
        assert "overwrite" not in str(e.value) and "\n" not in str(e.value)
        assert (tmp_path / LOCK).read_text() == before  # the owner's lock is untouched


def test_a_second_run_is_refused_in_one_line_before_it_reads_the_directory(tmp_path, capsys):
    """moka-train on a directory a live run holds: status 2, one line naming the owner, and no
    advice to overwrite it; the owner's files are untouched, its lock included."""
    from moka_jax.cli import train as cli
    from tests.training.test_train import tiny

    run = tmp_path / "run"
    run.mkdir()
    owner = {"pid": os.getppid(), "host": HOST, "started": time.time()}
    (run / LOCK).write_text(json.dumps(owner))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny(run)))
    assert cli.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"in use by another run (pid {owner['pid']} on {HOST}" in err[0]
    assert "overwrite" not in err[0]
    assert sorted(p.name for p in run.iterdir()) == [LOCK, "metrics.jsonl"]
    assert json.loads((run / LOCK).read_text()) == owner


def test_a_refused_plan_gives_back_the_directory_it_created(tmp_path):
    from moka_jax.config import ConfigError, config_from_dict
    from moka_jax.training.plan import plan_run
    from tests.training.test_train import tiny

    d = tiny(tmp_path / "new")
    d["adapter"]["targets"] = "no_such_layer$"  # found after the lock is taken
    with pytest.raises(ConfigError, match="no_such_layer") as e:
        plan_run(config_from_dict(d), num_devices=1, quiet=True)
    assert any(f.name == "_plan_locked" for f in __import__("traceback").extract_tb(
        e.value.__traceback__))
    assert not (tmp_path / "new").exists()
