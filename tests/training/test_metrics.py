"""metrics.jsonl never holds a step twice: cut back to the step a run (re)starts from."""

import json

from moka_jax.training.metrics import MetricsWriter, cut_metrics, read_metrics


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


def test_ema_is_tensorboards_debiased_smoothing():
    import numpy as np

    from moka_jax.training.metrics import ema

    y = np.array([4.0, 2.0, 3.0, 1.0])
    d = 0.8
    expect, acc = [], 0.0
    for i, v in enumerate(y):  # written out: acc_i = d acc_{i-1} + (1 - d) y_i, / (1 - d^(i+1))
        acc = d * acc + (1 - d) * v
        expect.append(acc / (1 - d ** (i + 1)))
    np.testing.assert_allclose(ema(y, d), expect, rtol=1e-12)
    assert ema(y, d)[0] == 4.0  # no pull towards 0 at the start
    np.testing.assert_allclose(ema(np.full(50, 0.3), 0.9), 0.3, rtol=1e-12)


def test_plot_losses_draws_both_panels_and_names_every_run(tmp_path, monkeypatch):
    import matplotlib.figure

    from moka_jax.training import metrics

    runs = {name: [{"step": s, "loss": 2.0 / s + shift} for s in range(1, 101)]
            + [{"step": s, "val_loss": 2.0 / s + shift} for s in (50, 100)]
            for name, shift in (("a", 0.0), ("b", 0.001))}
    saved, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: (saved.append(fig), save(fig, path, **kw)))
    png = metrics.plot_losses(runs, tmp_path / "l.png")
    assert png.stat().st_size > 0
    full, tail = saved[0].axes
    assert full.get_yscale() == "log"
    labels = [line.get_label() for line in tail.get_lines()]
    assert labels == ["a", "a (val_loss)", "b", "b (val_loss)"]
    assert all(min(line.get_xdata()) >= 20 for line in tail.get_lines())  # the last 4/5
    assert tail.get_ylim()[1] < 0.2  # zoomed to the late losses, not the step-1 loss of 2
