"""bench/results_report.py's label-prior section on hand-made records: chance from each item's
offered answers, the dev majority label, and each method's most-common-answer share."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import results_report  # noqa: E402  (bench/, on the path above)

P = {"methods": ["base", "lora-r16", "moka"], "eval": {"tasks": ["boolq", "ARC-Easy"]}}
# ARC items offer 3, 4 and 5 answers through their "Answer format" line
DEV = {"boolq": [{"instruction": "q", "answer": a} for a in ("true", "true", "false", "true")],
       "ARC-Easy": [{"instruction": f"q Answer format: {'/'.join(f'answer{i}' for i in range(1, k + 1))}",
                     "answer": a} for k, a in ((3, "answer2"), (4, "answer2"), (5, "answer1"),
                                               (4, "answer3"))]}


def run(method, seed, boolq, arc):
    return ("train", method, f"seed-{seed}"), {"eval": {"choice": {"tasks": {
        "boolq": {"preds": boolq}, "ARC-Easy": {"preds": arc}}}}}


RESULTS = dict([
    run("base", 0, ["true"] * 4, ["answer1"] * 4),
    run("lora-r16", 0, ["true", "true", "true", "false"], ["answer1", "answer2", "answer3", "answer4"]),
    run("lora-r16", 1, ["false"] * 4, ["answer2", "answer2", "answer1", "answer1"]),
])


def test_reference_rows_and_answer_shares():
    md, s = results_report.label_prior_table(P, RESULTS, DEV)
    chance_arc = (1 / 3 + 1 / 4 + 1 / 5 + 1 / 4) / 4
    assert s["chance"] == pytest.approx((0.5 + chance_arc) / 2)
    # boolq: "true" 3 of 4; ARC: "answer2" 2 of 4
    assert s["dev_majority_label"] == pytest.approx((0.75 + 0.5) / 2)
    assert "| 75.0 (true) | 50.0 (answer2) | **62.5** |" in md
    # base answers one thing everywhere; lora-r16's seeds: boolq 3/4 and 4/4, ARC 1/4 and 2/4
    assert s["most_common_answer_share"] == {
        "base": pytest.approx(1.0), "lora-r16": pytest.approx((0.875 + 0.375) / 2)}
    assert "| lora-r16: items given its most common answer | 87.5 ± 17.7 | 37.5 ± 17.7 |" in md
    assert "moka" not in md  # no evaluated run, no row


def test_most_common_counts_shares_and_breaks_ties_by_first_seen():
    assert results_report.most_common(["b", "a", "a", "b", "c"]) == ("b", pytest.approx(0.4))
    assert results_report.most_common(["x"] * 3) == ("x", 1.0)
