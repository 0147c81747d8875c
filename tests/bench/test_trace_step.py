"""bench/trace_step.py: reading a step's trace (families, concurrency, HLO sources)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import trace_step  # noqa: E402


def ev(name, ts, dur):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "args": {"hlo_op": name}}


def test_family_strips_only_the_numbering():
    assert trace_step.family("ynn_fusion.1935") == "ynn_fusion"
    assert trace_step.family("copy_bitcast_fusion") == "copy_bitcast_fusion"
    assert trace_step.family("while.3659") == "while"


def test_concurrency_splits_wall_time_by_ops_running():
    # a alone 0-10, a and b 10-20, b alone 20-40, nothing 40-50, c alone 50-60 (microseconds)
    events = [ev("a.1", 0, 20), ev("b.2", 10, 30), ev("c", 50, 10)]
    c = trace_step.concurrency(events)
    assert c["span_s"] == pytest.approx(60e-6)
    assert c["seconds_at"] == pytest.approx({"0": 10e-6, "1": 40e-6, "2+": 10e-6})
    assert c["alone_s"] == pytest.approx({"a": 10e-6, "b": 20e-6, "c": 10e-6})


def test_loops_are_left_out_and_sources_come_from_hlo_metadata():
    trace = {"traceEvents": [ev("while.3", 0, 100), ev("ynn_fusion.7", 0, 40),
                             {"ph": "M", "name": "thread_name"}]}
    events = trace_step.op_events(trace)
    assert [e["name"] for e in events] == ["ynn_fusion.7"]
    hlo = ('  %ynn_fusion.7 = f32[1024,16]{1,0} fusion(%a, %b), kind=kCustom, calls=%f.7, '
           'metadata={op_name="jit(_impl)/while/body/closed_call/dot_general" x=1}')
    src = trace_step.hlo_sources(hlo)
    assert src == {"ynn_fusion.7": ("f32[1024,16]", "loop/dot_general")}
    s = trace_step.summarise(events, src, top=5)
    assert s["operations"][0]["operation"] == "loop/dot_general"
    assert s["thread_seconds"] == pytest.approx(40e-6)
