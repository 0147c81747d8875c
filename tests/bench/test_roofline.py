"""bench/roofline.py: the step's flops by count agree with XLA's own count of the step."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import roofline  # noqa: E402
from timing import xla_flops  # noqa: E402


def test_counted_flops_match_xla_cost_analysis_of_the_step(monkeypatch):
    # a small LLaMA, 2 x 128: the count leaves out the adapters and elementwise work, which
    # XLA counts (softmax, norms, loss too); both are small beside the matmuls
    from moka_jax.models import llama, presets

    # the count is of the full score matrix; one query block computes exactly that
    monkeypatch.setattr(llama, "ATTENTION_BLOCK", 128)

    c = presets.tiny(hidden=256, intermediate=768, heads=4, kv_heads=2, vocab=2048, layers=2)
    counted = roofline.counted_flops(2, 2, 128, 8, config=c)
    compiled, _, _, _ = roofline.compiled_step(2, 2, 128, 8, config=c)
    xla = xla_flops(compiled)
    assert xla is not None
    assert counted["total"] == pytest.approx(xla, rel=0.05)
    assert counted["total"] == sum(v for k, v in counted.items() if k != "total")


def test_weighted_rate_is_total_flops_over_total_time():
    rates = {k: 100.0 for k in roofline.GEMMS}
    assert roofline.weighted(rates) == pytest.approx(100.0)
    slow = dict(rates, **{"576x1536": 50.0})
    assert 50.0 < roofline.weighted(slow) < 100.0


def test_cpu_times_reads_steal_and_grows():
    a = roofline.cpu_times()
    assert {"user", "idle", "steal"} <= set(a) and all(v >= 0 for v in a.values())
    sum(i * i for i in range(200_000))
    b = roofline.cpu_times()
    assert sum(b.values()) >= sum(a.values())
