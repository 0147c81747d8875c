"""metrics.jsonl never holds a step twice: cut back to the step a run (re)starts from."""

import json

from moka_jax.train.metrics import MetricsWriter, cut_metrics, read_metrics


def test_cut_keeps_steps_up_to_the_restart_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # killed mid-write
    assert cut_metrics(path, 2) == 3
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert cut_metrics(path, 2) == 0  # idempotent, no rewrite


def test_writer_resumes_without_duplicates(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    for s in (1, 2, 3):
        w.write(s, loss=float(s))
    w.close()  # "crash" after step 3; the checkpoint was at step 2
    w = MetricsWriter(tmp_path, tensorboard=False, keep_through=2)
    w.write(3, loss=30.0)
    w.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 30.0)]
    w = MetricsWriter(tmp_path, tensorboard=False, keep_through=0)  # a fresh start: nothing
    w.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == []
