"""bench/experiment_commonsense.py + results_report.py end to end on the tiny random model:
lr search on the validation split, seeds, both eval modes, report, resume, refusal, merge."""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
spec = importlib.util.spec_from_file_location("experiment", REPO / "bench" / "experiment_commonsense.py")
experiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(experiment)
import results_report  # noqa: E402  (bench/, on the path above)

PROTOCOL = {
    "methods": ["base", "lora-r16", "moka"], "reference": "lora-r16",
    "families": {"lora": {"methods": ["lora-r16"], "lrs": [1e-3, 1e-2]},
                 "moka": {"methods": ["moka"], "lrs": [1e-3, 1e-2]}},
    "search": {"steps": 1, "per": "method"}, "seeds": [0, 1], "data_seed": 42, "steps": 2,
    "batch_size": 4, "warmup_ratio": 0.1, "eval_every": 2, "save_every": 1,
    "eval": {"limit": 3, "tasks": ["boolq"], "modes": ["choice", "generate"],
             "max_new_tokens": 2, "batch_size": 4},
    "comparisons": [["moka", "lora-r16"]],
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    # Units that differ only in their seed compile the same programs: a persistent cache turns
    # those compilations (most of a tiny unit's time) into loads.
    import jax
    saved = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    jax.config.update("jax_compilation_cache_dir", str(tmp / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    (tmp / "sweep.yaml").write_text(yaml.safe_dump(PROTOCOL))
    md = tmp / "RESULTS.md"
    md.write_text("# Results\n\nhand-written reading\n\n" + results_report.BEGIN + "\nold\n"
                  + results_report.END + "\n\nhand-written tail\n")
    # One layer and a dense base: compilation is most of a tiny unit's time (nf4 training is
    # tested in tests/train).
    args = ["--sweep", str(tmp / "sweep.yaml"), "--tiny", "--in-process",
            "--set", "model.tiny.layers=1", "--set", "model.quant=none",
            "--out", str(tmp / "runs"), "--results", str(md), "--figures", str(tmp / "fig")]
    yield tmp, args
    for k, v in saved.items():
        jax.config.update(k, v)


def run(args, capsys) -> tuple[dict, str]:
    experiment.main(args)
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


def test_sweep_end_to_end(sweep, capsys):
    tmp, args = sweep
    out, _ = run(args, capsys)
    runs = tmp / "runs"
    # lr search: every trial scored on the validation split, the lowest loss chosen
    for m in ("lora-r16", "moka"):
        trials = {lr: json.loads((runs / "search" / m / f"lr-{lr:g}" / "result.json").read_text())
                  for lr in (1e-3, 1e-2)}
        assert all(t["train"]["val_loss"] > 0 for t in trials.values())
        assert "eval" not in trials[1e-3]  # the dev sets are never seen by the search
        best = min(trials, key=lambda lr: trials[lr]["train"]["val_loss"])
        assert out["chosen_lr"][m] == best
    # main runs: per seed, per mode, per item correctness
    recs = {}
    for m, seeds in (("base", [0]), ("lora-r16", [0, 1]), ("moka", [0, 1])):
        for s in seeds:
            rec = json.loads((runs / "train" / m / f"seed-{s}" / "result.json").read_text())
            recs[m, s] = rec
            for mode in ("choice", "generate"):
                t = rec["eval"][mode]["tasks"]["boolq"]
                assert len(t["flags"]) == t["n"] == 3 and sum(t["flags"]) == t["correct"]
                assert t["parsed"] + t["unparseable"] == 3
            if m != "base":
                assert rec["lr"] == out["chosen_lr"][m] and rec["seed"] == s
                assert rec["config"]["data"]["seed"] == 42 + s
                assert rec["train"]["final_step"] == 2
                ent = [x["gate_entropy"] for x in rec["train"]["metrics"] if "gate_entropy" in x]
                assert (len(ent) >= 1) == (m == "moka")
    # records hold the adapter relative to their unit, so a committed sweep resolves anywhere
    assert not Path(recs["moka", 0]["train"]["adapter_dir"]).is_absolute()
    a0 = experiment.adapter_path(runs, recs["moka", 0])
    meta = json.loads((a0 / "adapter.json").read_text())
    assert meta["data"] == {"template": "alpaca"}
    # the report: hand-written text kept, every section there, intervals from the per-item data
    text = (tmp / "RESULTS.md").read_text()
    assert text.startswith("# Results\n\nhand-written reading") and text.endswith("hand-written tail\n")
    assert "\nold\n" not in text
    for heading in ("lr search", "choice mode", "generate mode", "parse", "Paired bootstrap",
                    "Validation loss", "Gates", "Trained adapters", "Machine(s)", "Label priors"):
        assert heading in text, heading
    # label priors from the dev records the units were evaluated on (boolq: 3 items)
    gold = [r["answer"] for r in json.loads((REPO / "data" / "commonsense" / "boolq" / "dev.json")
                                             .read_text())[:3]]
    top = max(set(gold), key=gold.count)
    assert f"| {100 * gold.count(top) / 3:.1f} ({top}) |" in text
    preds = recs["base", 0]["eval"]["choice"]["tasks"]["boolq"]["preds"]
    share = max(preds.count(x) for x in preds) / 3
    assert out["label_priors"]["most_common_answer_share"]["base"] == pytest.approx(share)
    n_moka, n_lora = (recs[m, 0]["train"]["trainable_params"] for m in ("moka", "lora-r16"))
    assert f"| moka | {n_moka:,} | {n_moka / n_lora:.3f} |" in text
    assert f"| lora-r16 | {n_lora:,} | 1.000 |" in text
    vl = [recs["moka", s]["train"]["val_loss"] for s in (0, 1)]
    assert (f"| moka | 2 | {np.mean(vl):.4f} ± {np.std(vl, ddof=1):.4f} | "
            f"{vl[0]:.4f}, {vl[1]:.4f} |") in text
    flags = lambda m, mode: np.array([recs[m, s]["eval"][mode]["tasks"]["boolq"]["flags"]
                                      for s in (0, 1)], float)
    obs = (flags("moka", "choice").mean(0) - flags("lora-r16", "choice").mean(0)).mean()
    got = out["intervals"]["moka - lora-r16 (choice)"]
    assert got[0] == pytest.approx(obs) and got[1] <= obs <= got[2]
    for png in ("loss_curves.png", "gate_entropy.png", "gates_moka.png"):
        assert (tmp / "fig" / png).stat().st_size > 0
    assert sorted(p.name for p in (tmp / "fig" / "adapters").iterdir()) == [
        "lora-r16-seed0", "lora-r16-seed1", "moka-seed0", "moka-seed1"]


def test_killed_sweep_resumes_where_it_stopped(sweep, capsys):
    tmp, args = sweep
    unit = tmp / "runs" / "train" / "moka" / "seed-1"
    before = json.loads((unit / "eval-choice.json").read_text())
    # killed after the choice evaluation: result, generate mode and the train summary are gone
    for name in ("result.json", "eval-generate.json", "train.json"):
        (unit / name).unlink()
    _, log = run(args, capsys)
    assert log.count("reusing") == 4 + 4 and "train/moka/seed-1: run" in log
    rec = json.loads((unit / "result.json").read_text())
    assert rec["train"]["resumed_from"] == 2  # from the trainer's checkpoint: no step redone
    assert rec["eval"]["choice"] == before and "generate" in rec["eval"]


def test_other_settings_are_refused_and_nothing_is_deleted(sweep, capsys):
    tmp, args = sweep
    files = sorted(p for p in (tmp / "runs").rglob("*") if p.is_file())
    with pytest.raises(SystemExit, match=r"other settings:\n  steps: checkpoint 2 vs config 3"):
        experiment.main([*args, "--steps", "3"])
    assert sorted(p for p in (tmp / "runs").rglob("*") if p.is_file()) == files


def test_report_only_and_documented_merge_command(sweep, capsys):
    tmp, args = sweep
    md = tmp / "RESULTS.md"
    md.write_text(md.read_text().replace("| moka |", "| stale |"))
    out, _ = run([*args, "--report-only"], capsys)
    text = md.read_text()
    assert "| stale |" not in text and out["chosen_lr"] == {"lora-r16": out["chosen_lr"]["lora-r16"],
                                                            "moka": out["chosen_lr"]["moka"]}
    # the merge command RESULTS.md documents, run as written (from RESULTS.md's folder)
    cmd = next(line.strip() for line in text.splitlines() if "moka_jax.cli.export" in line)
    assert cmd.startswith("python -m moka_jax.cli.export --model random --adapter ")
    from moka_jax.cli.export import main as export_main
    argv = cmd.split()[3:]
    import os
    cwd = os.getcwd()
    os.chdir(md.parent)
    try:
        assert export_main(argv) == 0
    finally:
        os.chdir(cwd)
    merged = md.parent / argv[argv.index("--out") + 1]
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
    shutil.rmtree(merged)


def test_status_lists_units_and_estimates_the_compute_left(sweep, capsys):
    tmp, args = sweep
    unit = tmp / "runs" / "train" / "moka" / "seed-1"
    saved = {n: (unit / n).read_bytes() for n in ("result.json", "eval-generate.json")}
    try:
        for n in saved:                       # as if cut off after its choice evaluation
            (unit / n).unlink()
        out, log = run([*args, "--status"], capsys)
    finally:
        for n, data in saved.items():
            (unit / n).write_bytes(data)
    n_units = 2 * 2 + 1 + 2 * 2               # lr trials, base, methods x seeds
    assert out["done"] == n_units - 1 and out["to_run"] == 1
    assert "partial  train/moka/seed-1" in log and "trained, choice evaluated" in log
    moka0 = json.loads((tmp / "runs/train/moka/seed-0/result.json").read_text())["wall_seconds"]
    assert out["left_minutes_estimate"] == pytest.approx(moka0 / 60)   # the same method's unit
    assert out["units_without_estimate"] == []


def test_an_lr_value_added_to_the_grids_reuses_the_other_trials(sweep, capsys, tmp_path):
    """Grids widened by one value run only the new trials; if one wins, the main runs trained
    at the old pick are refused (nothing deleted), else they are reused."""
    tmp, args = sweep
    grid = yaml.safe_load((tmp / "sweep.yaml").read_text())
    for fam in grid["families"].values():      # every family gets the same number of trials
        fam["lrs"].append(5e-3)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(grid))
    wider = [str(tmp_path / "sweep.yaml") if a == str(tmp / "sweep.yaml") else a for a in args]
    val = lambda m, lr: json.loads((tmp / f"runs/search/{m}/lr-{lr:g}/result.json").read_text())[
        "train"]["val_loss"]
    try:
        try:
            experiment.main(wider)
            refused = None
        except SystemExit as e:
            refused = str(e)
        log = capsys.readouterr().out
        for m in ("lora-r16", "moka"):
            assert f"search/{m}/lr-0.001: reusing" in log and f"search/{m}/lr-0.01: reusing" in log
            assert f"search/{m}/lr-0.005: run" in log
        if any(val(m, 5e-3) < min(val(m, 1e-3), val(m, 1e-2)) for m in ("lora-r16", "moka")):
            assert "was trained at lr" in refused and "nothing was deleted" in refused
        else:
            assert refused is None and "train/moka/seed-1: reusing" in log
    finally:
        for m in ("lora-r16", "moka"):
            shutil.rmtree(tmp / f"runs/search/{m}/lr-0.005", ignore_errors=True)
