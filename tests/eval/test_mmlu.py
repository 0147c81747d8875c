"""MMLU: prompt format, CSV errors, per-subject / per-category / overall aggregation."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from moka_jax.data import DataError, byte_tokenizer
from moka_jax.eval import mmlu
from moka_jax.eval.commonsense import score_continuations
from tests.eval import tiny_model

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "data" / "mmlu"


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture
def toy_root(tmp_path):
    """Two subjects in two categories: abstract_algebra (STEM), philosophy (humanities)."""
    shutil.copy(SHIPPED / "subject_categories.json", tmp_path)
    for s in ("abstract_algebra", "philosophy"):
        write_csv(tmp_path / "data" / "dev" / f"{s}_dev.csv",
                  [[f"{s} shot {i}, with a comma?", "w", "x", "y", "z", "ABCD"[i]]
                   for i in range(3)])
        n = 3 if s == "philosophy" else 2
        write_csv(tmp_path / "data" / "val" / f"{s}_val.csv",
                  [[f"{s} q{i}", "1", "2", "3", "4", "ABCD"[i % 4]] for i in range(n)])
    return tmp_path


def test_prompt_format():
    shot = {"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": "B"}
    q = {"question": "2+2?", "choices": ["4", "5", "6", "7"], "answer": "A"}
    assert mmlu.build_prompt("high_school_mathematics", [shot], q) == (
        "The following are multiple choice questions (with answers) about high school "
        "mathematics.\n\n1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2+2?\nA. 4\nB. 5\nC. 6\nD. 7\n"
        "Answer:")


def test_aggregation_weights_questions():
    cats = {"abstract_algebra": "STEM", "college_physics": "STEM", "philosophy": "humanities"}
    per = {"abstract_algebra": {"correct": 1, "n": 4}, "college_physics": {"correct": 3, "n": 4},
           "philosophy": {"correct": 2, "n": 2}}
    out = mmlu.aggregate(per, cats)
    assert out["categories"]["STEM"] == {"correct": 4, "n": 8, "accuracy": 0.5}
    assert out["categories"]["humanities"]["accuracy"] == 1.0
    assert out["overall"] == {"correct": 6, "n": 10, "accuracy": 0.6}


def test_evaluate_toy_set(toy_root):
    tok, model = byte_tokenizer(), tiny_model()
    out = mmlu.evaluate_mmlu(model, tok, toy_root, shots=2, batch_size=2, progress=False)
    assert set(out["subjects"]) == {"abstract_algebra", "philosophy"}
    assert out["categories"]["STEM"]["n"] == 2 and out["categories"]["humanities"]["n"] == 3
    preds = out["predictions"]
    for cat, subject in (("STEM", "abstract_algebra"), ("humanities", "philosophy")):
        mine = [p for p in preds if p["subject"] == subject]
        acc = np.mean([p["pred"] == p["answer"] for p in mine])
        assert out["categories"][cat]["accuracy"] == pytest.approx(acc)
    assert out["overall"]["correct"] == sum(p["pred"] == p["answer"] for p in preds)
    # The prediction is the letter with the highest log-likelihood after the k-shot prompt.
    dev = mmlu.read_csv(toy_root / "data" / "dev" / "philosophy_dev.csv")[:2]
    row = mmlu.read_csv(toy_root / "data" / "val" / "philosophy_val.csv")[0]
    ctx = tok(mmlu.build_prompt("philosophy", dev, row))["input_ids"]
    letters = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in mmlu.CHOICES]
    want = score_continuations(model, [ctx], [letters], batch_size=1)[0]
    first = next(p for p in preds if p["subject"] == "philosophy")
    np.testing.assert_allclose(first["scores"], want, rtol=1e-4, atol=1e-4)


def test_bad_csv_names_file_and_field(tmp_path):
    write_csv(tmp_path / "x_val.csv", [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(DataError, match=r"x_val\.csv: row 1: field 'answer' = 'E'"):
        mmlu.read_csv(tmp_path / "x_val.csv")
    write_csv(tmp_path / "y_val.csv", [["q", "a", "b"]])
    with pytest.raises(DataError, match=r"y_val\.csv: row 1: expected 6 columns"):
        mmlu.read_csv(tmp_path / "y_val.csv")


def test_shipped_copy_is_complete():
    subjects = mmlu.subjects(SHIPPED)
    assert len(subjects) == 57 and mmlu.subjects(SHIPPED, "dev") == subjects
    cats = mmlu.load_categories(SHIPPED / "subject_categories.json")
    assert set(subjects) <= set(cats)
    assert set(cats.values()) == {"STEM", "humanities", "social sciences", "other"}
    val = SHIPPED / "data" / "val"
    assert sum(len(mmlu.read_csv(val / f"{s}_val.csv")) for s in subjects) == 1542
