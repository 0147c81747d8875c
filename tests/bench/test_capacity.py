"""bench/capacity.py: budgets matched within 10%, the E1 generator, the paired bootstrap, and
the whole driver (search, lr choice, main units, resume, report) on the tiny random model."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import capacity  # noqa: E402
import capacity_plan as plan  # noqa: E402
import capacity_report  # noqa: E402

PROTOCOL = plan.load_protocol(plan.CONFIGS / "protocol.yaml")


def test_every_method_within_ten_percent_of_its_budget():
    rows = plan.counts_table(PROTOCOL)
    assert {r["budget_params"] for r in rows} == {57_600, 230_400, 921_600}
    for r in rows:
        assert 0.9 <= r["ratio"] <= 1.1, r
    got = {(r["method"], r["budget"]): r["params"] for r in rows}
    assert got[("lora", "r4")] == 230_400 and got[("dora", "r16")] == 921_600 + 30 * 768
    assert ("dora", "r1") not in got  # magnitudes alone are 40% of the smallest budget


def test_e1_pairs_are_seeded_distinct_and_lowercase():
    a, b = capacity.e1_pairs(PROTOCOL, 0), capacity.e1_pairs(PROTOCOL, 0)
    assert a == b and a != capacity.e1_pairs(PROTOCOL, 1)
    keys = [r["instruction"] for r in a]
    assert len(keys) == len(set(keys)) == PROTOCOL["e1"]["pairs"]
    for r in a[:50]:
        assert r["instruction"][:-1].isalpha() and r["instruction"].endswith(":")
        assert r["output"][0] == " " and r["output"][1:].islower()
        assert len(r["output"]) == PROTOCOL["e1"]["value_len"] + 1


def _rec(greedy, seed=0):
    return {"unit": {"seed": seed}, "items": {"greedy": list(greedy)}}


def test_paired_interval_estimate_and_coverage():
    rng = np.random.default_rng(0)
    same = [_rec([1, 0, 1, 1]), _rec([0, 0, 1, 1], seed=1)]
    assert capacity_report.paired_interval(same, same, "e1", rng) == [0.0, 0.0, 0.0]
    a = [_rec([1] * 60 + [0] * 40)]
    b = [_rec([1] * 30 + [0] * 70)]
    est, lo, hi = capacity_report.paired_interval(a, b, "e1", rng)
    assert est == pytest.approx(0.30) and lo < 0.30 < hi and lo > 0.15
    # ratio of sums for E2 (token-weighted NLL)
    e2a = [{"unit": {"seed": 0}, "items": {"heldout": {"nll": [2.0, 6.0], "tokens": [1, 3]}}}]
    e2b = [{"unit": {"seed": 0}, "items": {"heldout": {"nll": [1.0, 3.0], "tokens": [1, 3]}}}]
    assert capacity_report.paired_interval(e2a, e2b, "e2", rng)[0] == pytest.approx(1.0)


TINY = ["model.path=random", "model.tokenizer=bytes", "model.tiny.layers=2",
        "model.tiny.hidden=64", "model.tiny.heads=4", "model.tiny.kv_heads=2",
        "model.tiny.intermediate=128", "data.cutoff_len=1024", "data.buckets=[1024]",
        "train.batch_size=2", "train.save_every=1"]


def _main(args, capsys) -> tuple[dict, str]:
    """One driver command in this process (its last stdout line is a JSON object): as
    subprocesses the four commands below each paid an interpreter's start, and the runs JAX's
    and the library's imports, on top of what they check."""
    assert capacity.main(args) == 0
    out = capsys.readouterr().out
    return json.loads(out.splitlines()[-1]), out


def test_driver_end_to_end_on_the_tiny_model(tmp_path, capsys, monkeypatch):
    # main() sets the driver's module globals from its arguments; restore them afterwards
    for name in ("PROTOCOL_PATH", "SETS", "TRAIN_SETS", "IN_PROCESS"):
        monkeypatch.setattr(capacity, name, getattr(capacity, name))
    # the driver is under test, not attention: one block per row of 1,024 (the default 64
    # unrolls 16 blocks per layer and doubled the compile time of every unit's programs;
    # tests/models/test_llama.py checks blocked attention against the full score matrix)
    from moka_jax.models import llama
    monkeypatch.setattr(llama, "ATTENTION_BLOCK", 1024)
    monkeypatch.chdir(REPO)
    p = yaml.safe_load((plan.CONFIGS / "protocol.yaml").read_text())
    # the tiny model's targets: q 64x64, v 32x64 (2 kv heads of 16), 2 layers
    p.update(dims={"q_proj": [64, 64], "v_proj": [32, 64]}, layers=2, lrs=[1e-3, 1e-2], widen=0,
             seeds=[0], budgets={"r1": 1, "r4": 4}, search_budget="r4",
             methods={"lora": {"kind": "lora"},
                      "moka": {"kind": "moka", "gate_lr_mult": 100.0},
                      "moka-ungated": {"kind": "moka", "gated": False, "budgets": ["r4"],
                                       "lr_from": "moka"}},
             comparisons=[["moka", "lora"], ["moka", "moka-ungated"]])
    p["e1"].update(pairs=12, epochs=1)
    p["e2"].update(heldout=4, val=4, forgetting=4, steps=2, train_limit=8, zeroshot_limit=2,
                   zeroshot_tasks=["boolq", "winogrande"])
    p["e2"].pop("lrs", None)  # both experiments search the test's two-value grid
    p["e3"].update(target_ranks=[8, 16], steps=2)
    proto = tmp_path / "protocol.yaml"
    proto.write_text(yaml.safe_dump(p))
    # the protocol's configs are found next to it
    for f in ("e1.yaml", "e2.yaml"):
        (tmp_path / f).write_text((plan.CONFIGS / f).read_text())
    out, results = tmp_path / "out", tmp_path / "RESULTS.md"
    cmd = ["--protocol", str(proto), "--out", str(out), "--results", str(results),
           "--in-process"] + sum((["--train-set", s] for s in TINY), [])
    st, _ = _main(cmd + ["--status"], capsys)
    assert st["done"] == 0 and st["left"] > 0
    final, _ = _main(cmd, capsys)
    st, _ = _main(cmd + ["--status"], capsys)
    # per experiment: 4 search trials, then 5 cells less the 2 search winners; E3: its two
    # targets (LoRA r8 and r16 on E2's data) and the fits of each. E1 on the tiny model (12
    # pairs, one epoch) recalls nothing at either budget: its power check fails once LoRA r1
    # and r4 ran, and E1's other main units (MoKA r1, ungated MoKA r4) are held, not run
    assert final["e1_budget_separates"] is False
    assert st["left"] == 0 and st["done"] == 2 * (4 + 5 - 2) + 4 - 2
    assert sorted(h.rsplit("-lr", 1)[0] for h in st["held_units"]) == [
        "e1/main/moka-r1/seed0", "e1/main/moka-ungated-r4/seed0"]  # lr: whichever MoKA's won
    assert (out / "e2" / "e3-target" / "lora-r8").is_dir()
    # an E2 search trial that lost was measured on validation only; the winner, which is
    # also the seed-0 main run, on everything
    proto_p = plan.load_protocol(proto)
    for m in ("lora", "moka"):
        won, _ = plan.chosen_lr(proto_p, out, "e2", m)
        for u in plan.search_units(proto_p, "e2"):
            if u.method == m:
                rec = plan.read_result(out, u)
                assert rec["measured"] == ("all" if u.lr == won else "val")
                assert ("heldout_nll" in rec) == ("zeroshot_acc" in rec) == (u.lr == won)
                # completing the winner keeps its validation record; it is not re-measured
                assert "val" in rec["items"] and rec["select"] == rec["val_nll"]
    # a main run that no search chose is measured on the held-out splits only
    mains = [plan.read_result(out, u) for u in plan.all_units(proto_p, out, ["e2"])
             if isinstance(u, plan.Unit) and u.phase != "search"]
    assert mains and all(set(r["items"]) == {"heldout", "general"} and "val_nll" not in r
                         for r in mains)
    for fit in ("lora", "kron_greedy", "moka"):
        errs = final["e3"][fit]
        assert set(errs) == {"1", "4"} and all(0.0 <= e[0] <= 1.0 for e in errs.values())
    # the truncated SVD is the optimum at a rank budget, and a larger budget fits better
    assert final["e3"]["lora"]["4"][0] <= final["e3"]["lora"]["1"][0]
    assert set(final["e3_controls"]) == {"gaussian", "lowrank"}
    # the further target is fitted without controls, and a wider LoRA fits it no worse
    more = final["e3_more_targets"]["lora-r16"]
    assert more["lora"]["4"][0] <= more["lora"]["1"][0]
    assert "e3_rel_error.png" in results.read_text()
    assert "| dW* of lora-r16 | moka |" in results.read_text()
    # an e3.json from before the further target (this suite's first E3 run) gains its fits
    # without the headline's being redone
    e3_file = plan.e3_path(out)
    e3 = json.loads(e3_file.read_text())
    headline = e3["e3"]
    e3.pop("more_targets")
    e3_file.write_text(json.dumps(e3))
    _main(cmd + ["--only", "e3"], capsys)
    e3 = json.loads(e3_file.read_text())
    assert e3["e3"] == headline and set(e3["more_targets"]) == {
        t.rel for t in plan.e3_targets(proto_p, out)[1:]}
    assert set(final["e2"]) == {"lora", "moka", "moka-ungated"}
    assert set(final["e1"]) == {"lora", "moka"} and set(final["e1"]["moka"]) == {"r4"}
    for exp in ("e1", "e2"):
        assert final[exp]["lora"]["r1"]["params"] == 2 * (64 + 64 + 32 + 64)
    assert 0.0 <= final["e1"]["lora"]["r4"]["recall"][0] <= 1.0
    assert "forgetting" in final["e2"]["moka"]["r4"]
    assert 0.0 <= final["e2"]["lora"]["r1"]["zeroshot_acc_norm"][0] <= 1.0
    assert any(k.startswith("e1:recall:moka-lora:") for k in final["intervals"])
    text = results.read_text()
    assert "held (E1's power check failed" in text
    assert capacity_report.BEGIN in text and "e1_recall.png" in text
    assert (out / "figures" / "e2_heldout_nll.png").exists()
    # every unit ran in one process here: its time is whole, its machine named
    assert final["compute"]["minutes"] > 0 and "not recorded" not in final["compute"]["machines"]
    assert "| e2 search | 4 |" in text and "Machines (units each ran): " in text
    # a finished suite runs nothing again
    _, again = _main(cmd, capsys)
    assert "[capacity] e" not in again


def test_time_left_is_estimated_per_experiment_at_the_median_pace():
    done = ["e2/search/a", "e2/search/b", "e2/search/c", "e3/fits"]
    secs = [600.0, 660.0, 7200.0, 60.0]  # one E2 unit shared the machine with a test run
    # e2 units at E2's median (660 s), e1 (none finished) at the overall median (630 s)
    assert plan._left_estimate(done, secs, ["e2/main/x", "e1/search/y"]) == round(1290 / 60, 1)
    assert plan._left_estimate([], [], ["e1/a"]) is None


def test_a_search_under_way_lists_its_trials_so_far(tmp_path):
    status = {"done": 3, "left": 1, "compute_minutes_spent": 1.0}
    lrs = {("e2", "lora"): (None, {0.001: 1.15, 0.003: 0.99}),  # 1e-2 not run yet
           ("e2", "moka"): (0.01, {0.001: 1.3, 0.003: 1.1, 0.01: 0.95}),
           ("e2", "mokas"): (None, {})}
    text = capacity_report.markdown(PROTOCOL, {}, {}, None, None, [], lrs, status, [], tmp_path)
    assert "| e2 | lora | searching | 0.001: 1.1500, 0.003: 0.9900 |  |" in text
    assert "| e2 | moka | 0.01 | 0.001: 1.3000, 0.003: 1.1000, 0.01: 0.9500 | yes |" in text
    assert "| e2 | mokas |" not in text


def test_paired_intervals_pair_a_seed_only_with_itself():
    rng = np.random.default_rng(0)

    a = [_rec([1] * 10, seed=0), _rec([0] * 10, seed=1)]
    b = [_rec([0] * 10, seed=1)]  # seed 0 of b not finished yet
    # only seed 1 pairs: 0 - 0, not seed 0's 1.0 against seed 1's 0.0
    assert capacity_report.paired_interval(a, b, "e1", rng)[0] == pytest.approx(0.0)
    assert capacity_report.intervals(
        {"comparisons": [["x", "y"]], "budgets": {"r4": 4}},
        {"e1": {("x", "r4"): a, ("y", "r4"): [_rec([1] * 10, seed=2)]}}) == {}


def test_an_interval_does_not_move_when_another_comparison_gains_records():
    rng = np.random.default_rng(3)

    def cell(p_true):
        return [_rec((rng.random(40) < p_true).astype(int), seed=0)]

    recs = {("x", "r1"): cell(0.3), ("y", "r1"): cell(0.5),
            ("x", "r4"): cell(0.6), ("y", "r4"): cell(0.4)}
    p = {"comparisons": [["x", "y"]], "budgets": {"r1": 1, "r4": 4}}
    alone = capacity_report.intervals(p, {"e1": {k: v for k, v in recs.items()
                                                 if k[1] == "r4"}})
    both = capacity_report.intervals(p, {"e1": recs})
    assert set(both) == {"e1:recall:x-y:r1", "e1:recall:x-y:r4"}
    assert both["e1:recall:x-y:r4"] == alone["e1:recall:x-y:r4"]


def test_a_resumed_unit_counts_every_process_and_says_when_a_time_is_cut_short(tmp_path):
    d = tmp_path / "unit"
    first = capacity.open_attempt(d)
    # the first process is killed 30 s after it started, its trainer's last write then
    metrics = d / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text('{"step": 5}\n')
    killed_at = first[-1]["start"] + 30.0
    os.utime(metrics, (killed_at, killed_at))
    second = capacity.open_attempt(d)
    assert second[0]["killed"] and second[0]["end"] == killed_at
    rec = capacity.close_attempt(d, second)
    assert rec["attempts"] == 2 and rec["seconds_all"] >= 30.0
    assert rec["seconds_all_complete"] is False and rec["machine"]
    # the attempts survive in the unit's directory for a third process
    assert len(json.loads((d / "attempts.json").read_text())) == 2
    # a unit trained in part before attempts were recorded: its earlier time is unknown
    old = tmp_path / "old"
    (old / "run").mkdir(parents=True)
    (old / "run" / "metrics.jsonl").write_text("")
    rec = capacity.close_attempt(old, capacity.open_attempt(old))
    assert rec["attempts"] == 2 and rec["seconds_all_complete"] is False
    # a process that raised (here: another run held the unit's lock) closed its own attempt
    failed = tmp_path / "failed"
    capacity.close_attempt(failed, capacity.open_attempt(failed), failed=True)
    atts = capacity.open_attempt(failed)
    assert atts[0]["failed"] and "killed" not in atts[0]
    rec = capacity.close_attempt(failed, atts)
    assert rec["attempts"] == 2 and rec["seconds_all_complete"] is True
    # a unit run through in one process
    fresh = tmp_path / "fresh"
    rec = capacity.close_attempt(fresh, capacity.open_attempt(fresh))
    assert rec["attempts"] == 1 and rec["seconds_all_complete"] is True


def test_the_plots_tell_the_moka_variants_apart_by_their_gate():
    p = plan.load_protocol(plan.CONFIGS / "protocol.yaml")
    labels = {m: capacity_report.method_label(p, m) for m in p["methods"]}
    assert labels["lora"] == "lora" and labels["moka"] == "moka (gate lr x100)"
    assert labels["moka-gate1"] == "moka-gate1 (gate lr x1)"
    assert labels["moka-ungated"] == "moka-ungated (no gate)"


def test_first_patterns_reorder_the_pending_units_and_drop_none():
    units = [plan.Unit("e2", "main", m, b, seed, 0.01) for seed in (0, 1)
             for m in ("lora", "moka", "moka-gate1") for b in ("r4", "r16")]
    order = capacity.prioritised(units, ["e2/main/moka-*-r4/seed1*", "e2/main/lora-r16/*"])
    assert [u.rel for u in order[:3]] == ["e2/main/lora-r16/seed0-lr0.01",
                                          "e2/main/lora-r16/seed1-lr0.01",
                                          "e2/main/moka-gate1-r4/seed1-lr0.01"]
    assert sorted(order, key=units.index) == units  # the rest in the suite's order, none lost
    assert capacity.prioritised(units) == units
    # a pattern naming a cell's folder picks its seeds, as a glob under it would
    assert ([u.rel for u in capacity.prioritised(units, ["e2/main/moka-r16"])[:2]]
            == ["e2/main/moka-r16/seed0-lr0.01", "e2/main/moka-r16/seed1-lr0.01"])
    assert (capacity.prioritised(units, ["e2/main/moka-r16/"])
            == capacity.prioritised(units, ["e2/main/moka-r16/*"]))
    assert capacity.prioritised(units, ["e2/main/moka-r1"]) == units  # r1 is not r16's prefix


def test_a_first_pattern_that_matches_no_unit_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--first 'e2/main/lora-r4/sede1\\*' matches no unit"):
        capacity.main(["--out", str(tmp_path / "out"), "--results", str(tmp_path / "R.md"),
                       "--only", "e2", "--first", "e2/main/lora-r4/sede1*"])
    assert not (tmp_path / "out" / "e2" / "main").exists()


def test_next_lr_steps_along_the_half_decade_grid():
    assert [plan.next_lr(x, up=True) for x in (1e-3, 3e-3, 1e-2, 3e-2)] == [3e-3, 1e-2, 3e-2, 0.1]
    assert [plan.next_lr(x, up=False) for x in (1e-3, 3e-3, 0.1)] == [3e-4, 1e-3, 3e-2]
    assert plan.next_lr(5e-3, up=True) == 1e-2 and plan.next_lr(5e-3, up=False) == 3e-3
    assert plan.next_lr(2e-3, up=False) == 1e-3


def _search_record(out, p, method, lr, score, **fields):
    u = plan.Unit("e1", "search", method, p["search_budget"], 0, lr)
    plan.write_json(out / u.rel / "result.json", {"select": score, **fields})


def test_a_winner_at_a_grid_edge_widens_the_grid_for_every_method_before_main_units(tmp_path):
    p = {**PROTOCOL, "methods": {"lora": {"kind": "lora"}, "moka": {"kind": "moka"},
                                 "dora": {"kind": "dora", "lr_from": "lora"}},
         "lrs": [1e-3, 3e-3, 1e-2], "widen": 2, "e1": dict(PROTOCOL["e1"])}
    p["e1"].pop("lrs", None)
    out = tmp_path / "out"
    # LoRA's trials so far: the grid stays the protocol's while MoKA's are missing
    for lr, s in ((1e-3, 3.0), (3e-3, 2.0), (1e-2, 1.0)):
        _search_record(out, p, "lora", lr, s)
    assert plan.search_lrs(p, "e1", out) == [1e-3, 3e-3, 1e-2]
    assert plan.chosen_lr(p, out, "e1", "lora") == (None, {1e-3: 3.0, 3e-3: 2.0, 1e-2: 1.0})
    # MoKA's winner is interior, LoRA's at the top edge: 3e-2 joins the grid for both, and
    # neither (nor DoRA, which takes LoRA's) has an lr until those trials ran
    for lr, s in ((1e-3, 2.0), (3e-3, 1.0), (1e-2, 1.5)):
        _search_record(out, p, "moka", lr, s)
    assert plan.search_lrs(p, "e1", out) == [1e-3, 3e-3, 1e-2, 3e-2]
    assert {u.rel for u in plan.search_units(p, "e1", out)} >= {
        "e1/search/lora-r4/seed0-lr0.03", "e1/search/moka-r4/seed0-lr0.03"}
    for m in p["methods"]:
        assert plan.chosen_lr(p, out, "e1", m)[0] is None
    assert not any(isinstance(u, plan.Unit) and u.phase == "main"
                   for u in plan.main_units(p, out, "e1"))
    # LoRA wins at the new edge again: 1e-1 joins; it wins there too, and the grid has
    # widened `widen` times, so 1e-1 is chosen (the report flags it as an edge)
    _search_record(out, p, "lora", 3e-2, 0.5)
    _search_record(out, p, "moka", 3e-2, 1.2)
    assert plan.search_lrs(p, "e1", out) == [1e-3, 3e-3, 1e-2, 3e-2, 0.1]
    _search_record(out, p, "lora", 0.1, 0.4)
    _search_record(out, p, "moka", 0.1, 9.0)
    assert plan.search_lrs(p, "e1", out) == [1e-3, 3e-3, 1e-2, 3e-2, 0.1]
    assert plan.chosen_lr(p, out, "e1", "lora")[0] == 0.1
    assert plan.chosen_lr(p, out, "e1", "dora")[0] == 0.1
    assert plan.chosen_lr(p, out, "e1", "moka")[0] == 3e-3
    # a winner at the bottom edge widens downwards
    _search_record(out, p, "moka", 1e-3, 0.1)
    assert plan.search_lrs(p, "e1", out)[0] == 3e-4


def test_the_committed_e2_search_is_not_widened():
    """The E2 grid widened by hand has every winner inside it: the rule adds no trial there."""
    out = REPO / "results" / "capacity"
    assert plan.search_lrs(PROTOCOL, "e2", out) == plan.search_lrs(PROTOCOL, "e2")
    assert {m: plan.chosen_lr(PROTOCOL, out, "e2", m)[0] for m in plan.searched(PROTOCOL)} == {
        "lora": 1e-2, "moka": 3e-2, "mokas": 1e-2}


def _power_protocol(tmp_path):
    """Two searched methods whose E1 search chose 3e-3 (inside the grid), two seeds."""
    p = {**PROTOCOL, "methods": {"lora": {"kind": "lora"}, "moka": {"kind": "moka"}},
         "lrs": [1e-3, 3e-3, 1e-2], "widen": 2, "seeds": [0, 1], "experiments": ["e1"],
         "e1": dict(PROTOCOL["e1"])}
    p["e1"].pop("lrs", None)
    out = tmp_path / "out"
    for m in p["methods"]:
        for lr, s in ((1e-3, 2.0), (3e-3, 1.0), (1e-2, 1.5)):
            _search_record(out, p, m, lr, s, unit={"seed": 0}, items={"greedy": [1] * 20},
                           seconds=60.0)
    return p, out


def test_a_failed_e1_power_check_holds_e1s_other_main_units(tmp_path, monkeypatch):
    p, out = _power_protocol(tmp_path)
    ran = []

    def fake_run(p_, out_, u, full=True):  # every budget recalls all pairs: no power
        ran.append(u.rel)
        rec = {"unit": {"seed": u.seed}, "items": {"greedy": [1] * 20}, "seconds": 60.0}
        plan.write_json(out_ / u.rel / "result.json", rec)
        return rec

    monkeypatch.setattr(capacity, "run_unit", fake_run)
    gate = [u.rel for u in plan.power_units(p, out)]
    assert sorted(gate) == sorted(f"e1/main/lora-{b}/seed{s}-lr0.003"
                                  for b in ("r1", "r16") for s in (0, 1))
    assert capacity_report.e1_power(p, out) is None and capacity_report.held_units(p, out, ["e1"]) == []
    capacity.run_all(p, out, ["e1"])
    # the check's own units ran first, then nothing else: the other units wait for a resize
    assert ran == gate
    assert capacity_report.e1_power(p, out) is False
    held = {u.rel for u in capacity_report.held_units(p, out, ["e1"])}
    assert held == {f"e1/main/moka-{b}/seed{s}-lr0.003" for b in ("r1", "r16") for s in (0, 1)} \
        | {"e1/main/moka-r4/seed1-lr0.003", "e1/main/lora-r4/seed1-lr0.003"}
    st = plan.status(p, out, ["e1"], capacity_report.held_units(p, out, ["e1"]))
    assert st["left"] == 0 and st["held"] == 6 and set(st["held_units"]) == held
    # a check that passes holds nothing: r1 recalls none of the pairs, r16 all
    for s in (0, 1):
        u = plan.Unit("e1", "main", "lora", "r1", s, 3e-3)
        plan.write_json(out / u.rel / "result.json",
                        {"unit": {"seed": s}, "items": {"greedy": [0] * 20}, "seconds": 60.0})
    assert capacity_report.e1_power(p, out) is True
    assert capacity_report.held_units(p, out, ["e1"]) == []
