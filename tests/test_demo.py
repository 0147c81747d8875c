"""demo.py on the tiny random model: before = the plain base, after = base + exported adapter,
scored on held-out GSM8K records the run never reads; a rerun only re-evaluates."""

import json
from pathlib import Path

import numpy as np
import pytest

import demo
from moka_jax.api import load
from moka_jax.config import load_config
from moka_jax.data import DataError, load_tokenizer
from moka_jax.eval.perplexity import response_scores
from moka_jax.io.attach import attach_exported_adapter

REPO = Path(__file__).resolve().parents[1]
TRAIN = '[{path: data/instruct/gsm8k/train.json, limit: 24}]'
SETS = [f"data.train={TRAIN}", "data.cutoff_len=640", "data.buckets=[1024]", "train.steps=3",
        "train.batch_size=2", "train.eval_every=0", "data.val_size=0", "data.format=alpaca"]
HELDOUT = 6


def _args(out, extra=()):
    args = ["--config", str(REPO / "configs" / "tiny-debug.yaml"), "--heldout", str(HELDOUT),
            "--rows", "2", "--max-new-tokens", "4", *extra]
    for s in SETS + [f"train.out_dir={out}/run"]:
        args += ["--set", s]
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    first = demo.main(_args(out))
    again = demo.main(_args(out, ["--commonsense", "--limit", "2", "--tasks", "boolq"]))
    return first, again, load_config(REPO / "configs" / "tiny-debug.yaml", SETS)


def _reference(model, cfg, tok):
    """Per-example NLL / token of the held-out records by the one-example-a-row scorer."""
    _, data = demo.heldout_data(cfg, demo.GSM8K, HELDOUT, tok)
    s = response_scores(model, data.input_ids, data.labels, batch_size=2)
    return s["nll"] / s["tokens"], s["nll"].sum() / s["tokens"].sum()


def test_before_is_the_base_and_after_is_the_exported_adapter(run):
    res, _, cfg = run
    tok = load_tokenizer("bytes")
    base, _ = load(cfg.model)
    per, overall = _reference(base, cfg, tok)
    pe = res["per_example"]
    np.testing.assert_allclose(np.divide(pe["nll_before"], pe["tokens"]), per, rtol=1e-5)
    assert res["heldout_before"] == pytest.approx(overall, rel=1e-5)
    attach_exported_adapter(base, res["adapter_dir"])
    per, overall = _reference(base, cfg, tok)
    np.testing.assert_allclose(np.divide(pe["nll_after"], pe["tokens"]), per, rtol=1e-5)
    assert res["heldout_after"] == pytest.approx(overall, rel=1e-5)
    assert res["heldout_after"] != pytest.approx(res["heldout_before"], rel=1e-6)  # trained


def test_results_carry_the_interval_example_params_plots_and_time(run):
    res, _, _ = run
    lo, hi = res["heldout_gain_ci95"]
    gain = res["heldout_before"] - res["heldout_after"]
    assert res["heldout_gain"] == pytest.approx(gain) and lo <= gain <= hi
    # a held-out prompt that fills cutoff_len (640 bytes here) scores nothing and is left out
    assert 0 < res["examples"] == len(res["per_example"]["tokens"]) <= HELDOUT
    assert min(res["per_example"]["tokens"]) > 0
    assert res["bootstrap"]["resamples"] == demo.N_BOOT
    # tiny model: q 64x64 and v 32x64 in 2 layers
    assert res["trainable_params"]["lora_r16"] == 2 * 16 * (128 + 96)
    assert res["trainable_params"]["moka"] > 0
    assert isinstance(res["example"]["before"], str) and isinstance(res["example"]["after"], str)
    assert Path(res["loss_png"]).is_file() and Path(res["gates_png"]).is_file()
    assert res["seconds_total"] > 0 and res["steps_run"] == 3
    # one compile each: the packed scorer, and prefill + decode, all reused after training
    # (fewer when an earlier test in this process compiled the same shapes)
    c = res["compilations"]
    assert c["train_step"] == 1 and 0 <= c["eval"] <= 1 and 0 <= c["generate"] <= 2
    run_dir = Path(res["adapter_dir"]).parent
    assert json.loads((run_dir / "demo_results.json").read_text())["heldout_gain_ci95"] == [lo, hi]
    assert "held-out NLL / token" in (run_dir / "demo_results.md").read_text()


def test_a_rerun_only_re_evaluates_and_commonsense_is_one_option_away(run):
    first, again, _ = run
    assert again["steps_run"] == 0 and "train" in again["seconds"]
    assert again["heldout_after"] == pytest.approx(first["heldout_after"], rel=1e-6)
    cs = again["commonsense"]
    assert cs["before"]["boolq"]["n"] == 2 and cs["after"]["boolq"]["n"] == 2
    md = (Path(again["adapter_dir"]).parent / "demo_results.md").read_text()
    assert "| boolq | 2 |" in md


def test_training_on_the_held_out_records_is_refused(tmp_path):
    args = _args(tmp_path) + ["--set", "data.train=[{path: data/instruct/gsm8k/train.json}]"]
    with pytest.raises(DataError, match="not held out"):
        demo.main(args)


def test_before_after_table_counts_flips():
    pred = lambda *flags: {"predictions": [{"flag": f} for f in flags], "n": len(flags),
                           "accuracy": sum(flags) / len(flags)}
    table = demo.before_after_table({"boolq": pred(True, False, False)},
                                    {"boolq": pred(False, True, True)})
    assert "| boolq | 3 | 33.3 | 66.7 | +33.3 | 2 | 1 |" in table
