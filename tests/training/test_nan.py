"""A diverging run stops with a clear message and keeps its last good checkpoint."""

import pytest

from moka_jax.config import config_from_dict
from moka_jax.training.loop import TrainingDiverged
from moka_jax.training.run import train
from tests.training.test_train import tiny


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # A huge learning rate (an infinite one is refused by its domain) makes the adapters
    # overflow to inf / nan after the first update.
    d = tiny(tmp_path, train__lr=1e38, train__save_every=1, train__steps=6, train__grad_clip=None)
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf).*last good checkpoint \(step 1\)"):
        train(config_from_dict(d), quiet=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]
