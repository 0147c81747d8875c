"""bench/ab_step.py: a setting string names trace-time constants and per-compile XLA options."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import ab_step  # noqa: E402


def test_setting_splits_trace_constants_from_xla_options():
    trace, xla = ab_step.parse_setting("block=64, chunk=256,xla_cpu_prefer_vector_width=512")
    assert trace == {"block": 64, "chunk": 256}
    assert xla == {"xla_cpu_prefer_vector_width": "512"}
    assert ab_step.parse_setting("") == ({}, {})
    assert ab_step.parse_setting("xla_cpu_use_onednn=True")[1] == {"xla_cpu_use_onednn": True}


@pytest.mark.parametrize("bad", ["block", "block=", "threads=2", "chunk=x", "block=0"])
def test_bad_setting_is_refused_before_any_compile(bad):
    with pytest.raises(SystemExit):
        ab_step.parse_setting(bad)


def test_trace_keys_name_real_module_constants():
    import importlib

    for mod, attr in ab_step.TRACE_KEYS.values():
        assert isinstance(getattr(importlib.import_module(mod), attr), int)
