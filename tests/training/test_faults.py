"""Faults end in one line and an exit status, and lose nothing: signals, full disks.

One table per mechanism: a new case is one row.
"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from moka_jax.cli.errors import DISK_FULL, guarded
from moka_jax.training.checkpoint import list_steps, verify_step
from moka_jax.training.metrics import read_metrics
from tests.training.test_train import REPO, tiny

NO_SPACE = os.strerror(errno.ENOSPC)


def small(out_dir, **over) -> dict:
    """The tiny random model on 15 short examples: the cheapest real training run."""
    d = tiny(out_dir, train__batch_size=4, train__log_every=1, **over)
    d["data"]["train"][0]["limit"] = 32
    d["model"]["tiny"]["layers"] = 1  # half the compile
    return d


def write_config(tmp_path, d) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


# ---- signals ---------------------------------------------------------------------------
# (signal, exit status): the run saves at the next step boundary and says where.
SIGNALS = [(signal.SIGINT, 130)]


def one_line(err: str, prog: str) -> str:
    """The command's own line; the rest of stderr is progress bars (tqdm, datasets)."""
    ours = [line for line in err.strip().splitlines() if line.startswith(f"{prog}: ")]
    assert len(ours) == 1 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == ours[0], err[-3000:]
    return ours[0]


@pytest.mark.parametrize("signum,status", SIGNALS)
def test_a_signal_saves_then_the_same_command_resumes(tmp_path, monkeypatch, capsys, signum,
                                                      status):
    """A real run, signalled after its first logged step: it saves, says where, and the same
    command resumes there. (To stay one compile cheaper, the resumed run also meets a full disk
    writing its adapter at the end: one line, and every checkpoint and metric is kept.)"""
    from moka_jax.cli import train as cli
    from moka_jax.training import loop

    run = tmp_path / "run"
    config = str(write_config(tmp_path, small(run, train__steps=12, train__save_every=100)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "moka_jax.cli.train", "--config", config],
                            env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-3000:]
    line = one_line(err, "moka-train")
    saved = int(line.split("saved checkpoint step ")[1].split()[0])
    assert line.startswith(f"moka-train: interrupted by {signum.name}: saved checkpoint step "
                           f"{saved} in {run}/checkpoints; run the same command to resume")
    assert list_steps(run / "checkpoints") == [saved]
    assert verify_step(run / "checkpoints" / str(saved)) is None
    assert not (run / ".moka_jax_lock.json").exists()  # the run gave its directory back

    monkeypatch.setattr(loop, "write_adapter", lambda *a, **k: no_space())
    capsys.readouterr()
    assert cli.main(["--config", config]) == DISK_FULL
    out, err = capsys.readouterr()
    assert f"resuming at step {saved}" in out
    line = one_line(err, "moka-train")
    assert f"disk full writing {run}" in line and NO_SPACE in line, line
    assert f"checkpoint step 12 in {run}/checkpoints is intact" in line, line
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 13))  # each step once
    assert verify_step(run / "checkpoints" / "12") is None


def test_a_second_signal_while_stopping_raises_at_once():
    from moka_jax.training.interrupt import Interrupted, deferred_signals

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="interrupted again by SIGTERM while stopping; kept"):
        with deferred_signals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM  # recorded, not raised
            stop.after = "kept"
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous  # restored


# ---- a full disk -----------------------------------------------------------------------

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, NO_SPACE)


class FullFile:
    """A file whose writes fail as on a full disk (an append-mode file's write does)."""

    def __init__(self, f):
        self.name, self._f = f.name, f

    def write(self, text):
        raise OSError(errno.ENOSPC, NO_SPACE)

    def __getattr__(self, name):
        return getattr(self._f, name)


def write_metrics(tmp):
    from moka_jax.training.metrics import MetricsWriter
    w = MetricsWriter(tmp, tensorboard=False)
    w.write(1, loss=2.0)
    w._file = FullFile(w._file)
    w.write(2, loss=1.0)


def write_adapter_over_old(tmp):
    from moka_jax.io.adapter_format import write_adapter
    write_adapter(tmp / "adapter", {"x": np.zeros(2, np.float32)}, adapter_config={},
                  targets="q", base={}, overwrite=True)


def plot(tmp):
    from moka_jax.training.metrics import plot_loss
    plot_loss([{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], tmp / "loss.png")


def write_report(tmp):
    from moka_jax.support.outputs import write_file_atomic
    write_file_atomic(tmp / "report.json", '{"new": 1}')


def export_orbax_over_old(tmp):
    from moka_jax.cli import export
    return export.main(["--adapter", str(tmp / "adapter"), "--out", str(tmp / "orbax"),
                        "--format", "orbax", "--overwrite"])


def save_checkpoint(tmp):
    import jax.numpy as jnp
    import optax

    from moka_jax.training.checkpoint import TrainCheckpointer
    ck = TrainCheckpointer(tmp / "run", {})
    p = {"a": jnp.ones(3)}
    ck.save(1, p, optax.adam(1e-3).init(p), {"epoch": 0, "position": 1, "seed": 0})


def seed(tmp):
    """What exists before the failing write, and must be whole after it."""
    from moka_jax.io.adapter_format import write_adapter
    write_adapter(tmp / "adapter", {"x": np.ones(2, np.float32)}, adapter_config={},
                  targets="q", base={})
    (tmp / "report.json").write_text('{"old": 1}')
    assert export_orbax_over_old(tmp) == 0


# (what fails: module attribute replaced, or None; the write; the path the line must name;
#  what the line must say is intact)
DISK_CASES = [
    (None, write_metrics, "metrics.jsonl", ""),
    ("safetensors.numpy.save_file", write_adapter_over_old, "adapter", "adapter is unchanged"),
    ("matplotlib.figure.Figure.savefig", plot, "loss.png", "redrawn from metrics.jsonl"),
    ("tempfile.mkstemp", write_report, "report.json", "report.json is unchanged"),
    ("orbax.checkpoint.StandardCheckpointer.save", export_orbax_over_old, "orbax",
     "orbax is unchanged"),
    ("orbax.checkpoint.CheckpointManager.save", save_checkpoint, "run/checkpoints/1",
     "the checkpoints before it are intact"),
]


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "metrics.jsonl"}


@pytest.mark.parametrize("target,write,path,intact", DISK_CASES,
                         ids=[c[1].__name__ for c in DISK_CASES])
def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, monkeypatch, capsys, target,
                                                   write, path, intact):
    seed(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    if target is not None:
        module, _, attr = target.rpartition(".")
        try:
            owner = __import__("importlib").import_module(module)
        except ImportError:  # a class attribute: module.Class.attr
            mod, _, cls = module.rpartition(".")
            owner = getattr(__import__("importlib").import_module(mod), cls)
        monkeypatch.setattr(owner, attr, no_space)
    status = guarded("moka-test")(lambda argv: write(tmp_path) or 0)()
    err = capsys.readouterr().err.strip().splitlines()
    assert status == DISK_FULL and len(err) == 1, err
    assert f": error: disk full writing {tmp_path}/{path} " in err[0], err
    assert NO_SPACE in err[0] and intact in err[0], err
    assert snapshot(tmp_path) == before  # nothing lost, nothing half-written left beside it
