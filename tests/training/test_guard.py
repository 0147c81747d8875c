"""The divergence guard: one row a case (step metrics -> stop or not, and the hint)."""

import math

import pytest

from moka_jax.training.guard import EXPLODING, ZERO_STEPS, ZeroGradWatch, divergence

NAN, INF = math.nan, math.inf

# (step, loss, grad_norm, lr, updates_before, None or a regex the reason must match)
CASES = [
    (5, 2.3, 1.7, 1e-3, 4, None),
    (5, 2.3, EXPLODING, 1e-3, 4, None),                      # the edge itself is allowed
    (5, NAN, 1.7, 1e-3, 4, r"loss is nan at step 5; the lr at this step is 0.001: lower"),
    (5, 2.3, INF, 1e-3, 4, r"gradient norm is inf at step 5; the lr .* lower train.lr"),
    (5, 2.3, NAN, 1e-3, 4, r"gradient norm is nan at step 5"),
    (5, 2.3, 1e12, 1e-3, 4, r"gradient norm is 1e\+12 \(> 1e\+10\) at step 5"),
    (1, NAN, 1.7, 0.0, 0, r"no update has been applied yet, so the lr is not the cause"),
    (1, 2.3, INF, 1e-3, 0, r"no update has been applied yet.*adapter.scale"),
    (2, NAN, NAN, 1e-4, 0, r"no update has been applied yet"),  # warm-up: step 1 at lr 0
]


@pytest.mark.parametrize("step,loss,grad_norm,lr,updates,want", CASES)
def test_divergence(step, loss, grad_norm, lr, updates, want):
    got = divergence(step, loss, grad_norm, lr, updates_before=updates)
    if want is None:
        assert got is None
    else:
        assert got is not None and __import__("re").search(want, got), got
        if updates == 0:
            assert "lower train.lr" not in got


def test_zero_gradient_warns_once_after_a_run_of_zeros():
    said = []
    watch = ZeroGradWatch(warn=said.append)
    for s in range(1, ZERO_STEPS):
        watch(s, 0.0, 1e6)
    watch(ZERO_STEPS, 0.5, 1e6)                 # a non-zero step resets the run
    assert said == []
    for s in range(ZERO_STEPS + 1, 3 * ZERO_STEPS + 2):
        watch(s, 0.0, 1e6)
    assert len(said) == 1 and f"0 for {ZERO_STEPS} steps" in said[0] and "lr 1e+06" in said[0]


def test_an_infinite_gradient_stops_the_run_before_the_loss_does(tmp_path):
    """adapter.scale = 1e38: dW is 0 at init so the loss is finite, but the gradient is not;
    the run stops at step 1 keeping nothing newer, and the hint does not blame the lr."""
    from moka_jax.config import config_from_dict
    from moka_jax.training.loop import TrainingDiverged
    from moka_jax.training.run import train
    from tests.training.test_train import tiny

    d = tiny(tmp_path, train__steps=4, train__save_every=1, train__grad_clip=None,
             train__warmup_steps=1)
    d["adapter"]["scale"] = 1e38
    with pytest.raises(TrainingDiverged, match=r"gradient norm is (inf|nan) at step 1; no update "
                                               r"has been applied yet") as e:
        train(config_from_dict(d), quiet=True)
    assert "lower train.lr" not in str(e.value)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
