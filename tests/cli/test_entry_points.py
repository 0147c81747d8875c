"""Every [project.scripts] command: its entry point resolves and `--help` works, called as the
installed script would be, and as `python -m <module>` in a fresh interpreter."""

import importlib
import os
import subprocess
import sys
import tomllib

import pytest

from moka_jax.config import REPO_ROOT

SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
EXPECTED = {"moka-train", "moka-eval", "moka-export", "moka-generate", "moka-convert",
            "moka-lm-eval"}


def test_the_commands_the_issue_promised_are_declared():
    assert set(SCRIPTS) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_entry_point_help(name, capsys, monkeypatch):
    module, func = SCRIPTS[name].split(":")
    if module == "moka_jax.eval.lm_eval":
        pytest.importorskip("lm_eval")
    main = getattr(importlib.import_module(module), func)
    monkeypatch.setattr(sys, "argv", [name, "--help"])  # how a console script calls main()
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out.lower() and ("--model" in out or "--config" in out or "SRC" in out)


def test_python_m_help_in_fresh_interpreters():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    modules = sorted({v.split(":")[0] for v in SCRIPTS.values()})
    procs = {m: subprocess.Popen([sys.executable, "-m", m, "--help"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
             for m in modules}
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (m, err[-2000:])
        assert "usage" in out.lower(), m
