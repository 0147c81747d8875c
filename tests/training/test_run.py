"""training.run.train (moka_jax.train): a YAML path and overrides in, the loop's summary out."""

from pathlib import Path

import pytest

import moka_jax as mj

CONFIG = Path(__file__).resolve().parents[2] / "configs/tiny-debug.yaml"


def test_train_from_a_yaml_path_and_overrides(tmp_path):
    sets = [f"train.out_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=2",
            "train.eval_every=0", "train.save_every=0", "data.val_size=0",
            "data.train=[{path: data/commonsense_train/boolq/train.json, limit: 8}]"]
    s = mj.train(str(CONFIG), sets, quiet=True)
    assert s["final_step"] == 2 and len(s["losses"]) == 2 and s["run_dir"] == str(tmp_path / "run")
    model, _ = mj.load("random", adapter=s["adapter_dir"])  # the adapter the run exported
    assert mj.count_params(model) == s["trainable_params"]


def test_overrides_go_with_a_path_not_a_config():
    cfg = mj.load_config(CONFIG)
    with pytest.raises(TypeError, match="overrides apply to a YAML path"):
        mj.train(cfg, ["train.steps=1"])
    with pytest.raises(TypeError, match="a Config or a YAML path"):
        mj.train({"model": {}})
