"""MMLU k-shot accuracy by the log-likelihood of the answer letter (Hendrycks et al. prompts).

Shots come from the dev split (the first k of the subject), questions from the val split.
Per subject, per category (STEM / humanities / social sciences / other, the authors'
categories.py map) and overall; category and overall accuracies weight every question equally.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from moka_jax.support import files
from moka_jax.data import DataError, pad_id, require_tokenizer
from moka_jax.eval.commonsense import score_continuations
from moka_jax.models.llama import check_positions

CHOICES = ("A", "B", "C", "D")


def read_csv(path) -> list[dict]:
    """Rows of an original MMLU CSV (question, A, B, C, D, answer letter; no header)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MMLU file not found: {path}")
    rows = []
    try:
        text = files.read_text(path, "MMLU CSV file")
    except files.FileCheckError as e:
        raise DataError(str(e)) from None
    for n, row in enumerate(csv.reader(io.StringIO(text, newline="")), 1):
        if len(row) != 6:
            raise DataError(f"{path}: row {n}: expected 6 columns (question, A, B, C, D, "
                            f"answer), got {len(row)}")
        if row[5].strip() not in CHOICES:
            raise DataError(f"{path}: row {n}: field 'answer' = {row[5]!r}, expected A-D")
        rows.append({"question": row[0], "choices": row[1:5], "answer": row[5].strip()})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def format_subject(subject: str) -> str:
    return " " + " ".join(subject.split("_"))


def format_example(row: dict, with_answer: bool = True) -> str:
    text = row["question"] + "".join(f"\n{c}. {t}" for c, t in zip(CHOICES, row["choices"]))
    return text + "\nAnswer:" + (f" {row['answer']}\n\n" if with_answer else "")


def build_prompt(subject: str, shots: list[dict], row: dict) -> str:
    head = ("The following are multiple choice questions (with answers) "
            f"about{format_subject(subject)}.\n\n")
    return head + "".join(format_example(s) for s in shots) + format_example(row, False)


def load_categories(path) -> dict[str, str]:
    """subject -> category (STEM, humanities, social sciences, other)."""
    d = files.read_json_object(path, "MMLU categories file")
    sub_to_cat = {s: c.split(" (")[0] for c, subs in d["categories"].items() for s in subs}
    return {subject: sub_to_cat[subs[0]] for subject, subs in d["subcategories"].items()}


def subjects(root, split: str = "val") -> list[str]:
    suffix = f"_{split}.csv"
    return sorted(p.name[:-len(suffix)] for p in (Path(root) / "data" / split).glob(f"*{suffix}"))


def aggregate(per_subject: dict[str, dict], categories: dict[str, str]) -> dict:
    """{"subjects", "categories", "overall"}; accuracies are correct / questions."""
    cats: dict[str, list] = {}
    for s, r in per_subject.items():
        c = cats.setdefault(categories.get(s, "other"), [0, 0])
        c[0] += r["correct"]
        c[1] += r["n"]
    correct = sum(r["correct"] for r in per_subject.values())
    n = sum(r["n"] for r in per_subject.values())
    return {"subjects": per_subject,
            "categories": {c: {"correct": k, "n": m, "accuracy": k / m}
                           for c, (k, m) in sorted(cats.items())},
            "overall": {"correct": correct, "n": n, "accuracy": correct / n if n else 0.0}}


def evaluate_mmlu(model, tokenizer, root, *, shots: int = 5, subjects_: list[str] | None = None,
                  limit: int | None = None, max_len: int | None = None, batch_size: int = 4,
                  progress: bool = True) -> dict:
    """k-shot MMLU on `root`/data/{dev,val}; limit = questions per subject. max_len: the
    longest prompt + answer (shots are dropped until it fits); default and upper bound: the
    model's max_position_embeddings."""
    require_tokenizer(tokenizer, "evaluate_mmlu")
    max_len = max_len or model.config.max_position_embeddings
    check_positions(max_len, model.config, "evaluate_mmlu: max_len",
                    f"lower max_len to at most {model.config.max_position_embeddings}")
    root = Path(root)
    categories = load_categories(root / "subject_categories.json")
    letters = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in CHOICES]
    ctxs, meta = [], []
    for s in subjects_ or subjects(root):
        dev = read_csv(root / "data" / "dev" / f"{s}_dev.csv")[:shots]
        for row in read_csv(root / "data" / "val" / f"{s}_val.csv")[:limit]:
            k = len(dev)
            ids = tokenizer(build_prompt(s, dev[:k], row))["input_ids"]
            while len(ids) + 2 > max_len and k > 0:  # drop shots until it fits, as the authors do
                k -= 1
                ids = tokenizer(build_prompt(s, dev[:k], row))["input_ids"]
            ctxs.append(ids)
            meta.append((s, row["answer"]))
    scores = score_continuations(model, ctxs, [letters] * len(ctxs), pad_id=pad_id(tokenizer),
                                 batch_size=batch_size, progress="mmlu" if progress else None)
    per_subject: dict[str, dict] = {}
    preds = []
    for (s, ans), sc in zip(meta, scores):
        pred = CHOICES[int(np.argmax(sc))]
        r = per_subject.setdefault(s, {"correct": 0, "n": 0})
        r["correct"] += pred == ans
        r["n"] += 1
        preds.append({"subject": s, "answer": ans, "pred": pred, "scores": sc.tolist()})
    for r in per_subject.values():
        r["accuracy"] = r["correct"] / r["n"]
    out = aggregate(per_subject, categories)
    out["shots"], out["predictions"] = shots, preds
    return out


def mmlu_table(result: dict) -> str:
    lines = [f"{'category':<16}  {'n':>5}  {'acc %':>6}"]
    for c, r in result["categories"].items():
        lines.append(f"{c:<16}  {r['n']:>5}  {100 * r['accuracy']:>6.2f}")
    o = result["overall"]
    lines.append(f"{'overall':<16}  {o['n']:>5}  {100 * o['accuracy']:>6.2f}")
    return "\n".join(lines)
