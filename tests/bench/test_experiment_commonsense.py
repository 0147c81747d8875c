"""bench/experiment_commonsense.py end to end on the tiny random model (bytes tokenizer)."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("experiment", REPO / "bench" / "experiment_commonsense.py")
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)

# The tiny-debug model and data sizes in place of SmolLM2's.
TINY = ["model.path=random", "model.tokenizer=bytes", "model.tiny.vocab=259",
        "model.tiny.hidden=64", "model.tiny.layers=2", "model.tiny.heads=4",
        "model.tiny.kv_heads=2", "model.tiny.intermediate=128", "data.cutoff_len=512",
        "data.buckets=[512]", "train.steps=2", "train.warmup_steps=1",
        "data.train=[{path: data/commonsense_train/boolq/train.json, limit: 32}]"]


def test_sweep_writes_table_plots_and_reuses_results(tmp_path, capsys):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n\nhand-written reading\n\n" + experiment.BEGIN + "\nold\n"
                          + experiment.END + "\n\nhand-written tail\n")
    args = ["--methods", "base", "moka", "--limit", "2", "--gen-limit", "1",
            "--gen-tasks", "boolq", "--out", str(tmp_path / "runs"), "--results", str(results_md),
            "--figures", str(tmp_path / "fig")]
    for s in TINY:
        args += ["--set", s]
    experiment.main(args)
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["choice_average"]) == {"base", "moka"}
    assert out["trainable_params"]["base"] == 0 and out["trainable_params"]["moka"] > 0
    text = results_md.read_text()
    assert text.startswith("# Results\n\nhand-written reading") and text.endswith("hand-written tail\n")
    assert "\nold\n" not in text and "| moka |" in text and "| base |" in text
    assert (tmp_path / "fig" / "loss_curves.png").stat().st_size > 0
    assert (tmp_path / "fig" / "moka_gates.png").stat().st_size > 0
    rec = json.loads((tmp_path / "runs" / "moka" / "result.json").read_text())
    assert rec["choice"]["boolq"]["n"] == 2 and rec["generate"]["boolq"]["n"] == 1
    assert len(rec["metrics"]) == 1  # log_every 2, steps 2

    experiment.main(args)  # nothing to rerun: every result.json matches its settings
    assert capsys.readouterr().out.count("reusing") == 2

    # Other settings over saved results: refused before any work, and nothing is deleted.
    with pytest.raises(SystemExit, match="other settings"):
        experiment.main([*args, "--limit", "3"])
    assert (tmp_path / "runs" / "moka" / "result.json").exists()
