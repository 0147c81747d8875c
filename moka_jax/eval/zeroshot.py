"""Zero-shot multiple-choice accuracy on the commonsense dev sets, scored as lm-eval scores them.

    tasks = load_tasks("data/commonsense", limit=50)          # eval.commonsense.load_tasks
    r = evaluate_zeroshot(model, tokenizer, tasks)
    r["tasks"]["piqa"]["acc_norm"], r["average"]["acc"]

What it measures: the base model's own preference among the options' *texts*, with no
instruction, no answer-format line and no "answerN" labels. Each record of the LLM-Adapters
format is parsed back into the fields lm-evaluation-harness (0.4.x) uses for the task; the
prompt is the task's lm-eval `doc_to_text`, each option's text is a continuation after the
target delimiter " ", and the option with the highest summed log-prob is the prediction (acc).
acc_norm divides each option's log-prob by the length in characters of lm-eval's
`doc_to_choice` string (the option's text; for winogrande, lm-eval's choice strings are the
per-option contexts), as lm-eval's multiple_choice metric does. The label-scored "choice" mode
(eval.commonsense) instead asks the fine-tuning prompt and ranks the label tokens
("answer1" ...): it measures whether a model learned the answer format as much as the content.

Per task (lm-eval's task name in brackets), context | continuations:

    boolq       [boolq]          "Question: {question}?\\nAnswer:" | " no", " yes"
    piqa        [piqa]           "Question: {goal}\\nAnswer:" | " {sol1}", " {sol2}"
    social_i_qa [social_iqa]     "Q: {context} {question}\\nA:" | " {answerA}" ...
    hellaswag   [hellaswag]      "{activity_label}: {ctx}" (preprocessed) | " {ending}" ...
    winogrande  [winogrande]     "{sentence up to _}{option}" per option | " {rest of sentence}"
    ARC-Easy, ARC-Challenge      "Question: {question}\\nAnswer:" | " {choice text}" ...
    openbookqa  [openbookqa]     "{question_stem}" | " {choice text}" ...

Where the records lack what lm-eval has:
- boolq: LLM-Adapters dropped the passage, so lm-eval's "{passage}\\n" prefix is empty and is
  left out (with its newline): this is closed-book BoolQ, not comparable to lm-eval's boolq.
- social_i_qa: the record joins SIQA's context and question with one space, exactly as
  lm-eval's prompt does, so both are kept as one field ("question").
- hellaswag: the dev set was rebuilt from a text dump without the WikiHow markup and with
  ctx = ctx_a + " " + ctx_b as it is (data/commonsense/hellaswag/SOURCE.md). lm-eval's
  preprocess (strip, " [title]" -> ". ", drop [...] tags, collapse double spaces) is applied
  to the query and the endings (it finds no markup here), and lm-eval's ctx_b.capitalize() is
  restored where ctx_b is recoverable: on ActivityNet items (WikiHow ones begin "How to " and
  have an empty ctx_b) the lower-case fragment after the context's last sentence end.

Tokenisation follows lm-eval's HF model: context and context + continuation are encoded
whole with the tokenizer's default special tokens, trailing spaces of the context move to the
continuation, and the continuation's tokens are the whole's tokens past the context's.
Scoring is eval.commonsense.score_continuations (context in the KV cache once per row);
rows from all tasks are pooled by candidate count and continuation length, so tasks share
compiled shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from moka_jax.data import DataError, require_tokenizer
from moka_jax.eval.commonsense import _pad, _round_up, length_bucket, score_continuations

TARGET_DELIMITER = " "
# The tasks for which lm-eval's config reports acc_norm (the others report acc only; acc_norm
# is computed for every task all the same).
LM_EVAL_ACC_NORM = ("piqa", "hellaswag", "ARC-Easy", "ARC-Challenge", "openbookqa")
LM_EVAL_NAMES = {"boolq": "boolq", "piqa": "piqa", "social_i_qa": "social_iqa",
                 "hellaswag": "hellaswag", "winogrande": "winogrande",
                 "ARC-Easy": "arc_easy", "ARC-Challenge": "arc_challenge",
                 "openbookqa": "openbookqa"}
ZEROSHOT_TASKS = tuple(LM_EVAL_NAMES)


@dataclass(frozen=True)
class Doc:
    """One record in lm-eval's terms: the task's named fields, the options' own texts and the
    gold option's index."""
    task: str
    fields: dict
    options: tuple[str, ...]
    gold: int


# ----------------------------------------------------------------------------- parsing

_QUESTION = "Please choose the correct answer to the question: "
_HEADS = {
    "boolq": "Please answer the following question with true or false, question: ",
    "piqa": "Please choose the correct solution to the question: ",
    "social_i_qa": _QUESTION, "ARC-Easy": _QUESTION, "ARC-Challenge": _QUESTION,
    "openbookqa": _QUESTION,
    "hellaswag": "Please choose the correct ending to complete the given sentence: ",
    "winogrande": "Please choose the correct answer to fill in the blank to complete the "
                  "given sentence: ",
}
_LABEL = {"piqa": "Solution", "hellaswag": "Ending", "winogrande": "Option"}  # else Answer
_SEP = {"piqa": "\n\n", "winogrande": " "}  # between options; else " "
_END = {"winogrande": " "}  # between the last option and "Answer format:"; else "\n\n"


def _fail(task: str, index: int, what: str, text: str):
    short = text if len(text) <= 160 else text[:157] + "..."
    raise DataError(f"{task} record {index}: {what} (instruction {short!r})")


def _gold(task: str, index: int, record: dict, n: int) -> int:
    answer = record.get("answer")
    if task == "boolq":
        if answer not in ("true", "false"):
            _fail(task, index, f"answer {answer!r} is not true/false", record["instruction"])
        return int(answer == "true")  # lm-eval's choices are ["no", "yes"]
    stem = _LABEL.get(task, "Answer").lower()
    m = re.fullmatch(rf"{stem}(\d+)", answer or "")
    if not m or not 1 <= int(m.group(1)) <= n:
        _fail(task, index, f"answer {answer!r} is not one of {stem}1..{stem}{n}",
              record["instruction"])
    return int(m.group(1)) - 1


def parse_record(task: str, record: dict, index: int = 0) -> Doc:
    """The record's lm-eval fields, option texts and gold index; DataError naming the task,
    the record's index and what was not found."""
    if task not in _HEADS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(ZEROSHOT_TASKS)}")
    text = record.get("instruction")
    if not isinstance(text, str):
        _fail(task, index, "no 'instruction' string", repr(record))
    head = _HEADS[task]
    if not text.startswith(head):
        _fail(task, index, f"the {task} opening {head.strip()!r} not found", text)
    body = text[len(head):]
    if task == "boolq":
        m = re.fullmatch(r"(.+)\n\nAnswer format: true/false", body, re.S)
        if not m:
            _fail(task, index, "question followed by 'Answer format: true/false' not found", text)
        question = m.group(1).strip()
        question = question[:-1] if question.endswith("?") else question  # lm-eval adds "?"
        return Doc(task, {"passage": "", "question": question}, ("no", "yes"),
                   _gold(task, index, record, 2))

    fmt = re.search(r"Answer format: ((?:[a-z]+\d/)*[a-z]+\d)$", body)
    if not fmt:
        _fail(task, index, "no 'Answer format: x1/x2/...' line at the end", text)
    n = len(fmt.group(1).split("/"))
    label = _LABEL.get(task, "Answer")
    sep = _SEP.get(task, " ")
    pattern = (r"(.+?)\n\n" + sep.join(rf"{label}{k}: (.*?)" for k in range(1, n + 1))
               + re.escape(_END.get(task, "\n\n")) + re.escape(fmt.group(0)))
    m = re.fullmatch(pattern, body, re.S)
    if not m:
        _fail(task, index, f"the {n} options '{label}1: ...{sep!r}{label}2: ...' (as the answer "
                           "format line lists) not found", text)
    stem, options = m.group(1), tuple(o.strip() for o in m.groups()[1:])
    empty = [k + 1 for k, o in enumerate(options) if not o]
    if empty:
        _fail(task, index, f"empty option text {label}{empty[0]}", text)
    gold = _gold(task, index, record, n)
    if task == "piqa":
        fields = {"goal": stem, "sol1": options[0], "sol2": options[1]}
    elif task == "social_i_qa":
        fields = {"question": stem}  # SIQA's context + " " + question, as lm-eval joins them
    elif task == "hellaswag":
        if ": " not in stem:
            _fail(task, index, "'activity_label: ctx' not found", text)
        label_, ctx = stem.split(": ", 1)
        fields = {"activity_label": label_, "ctx": ctx}
        options = tuple(hellaswag_preprocess(o) for o in options)
    elif task == "winogrande":
        if stem.count("_") != 1:
            _fail(task, index, f"one blank '_' in the sentence not found "
                               f"({stem.count('_')} found)", text)
        fields = {"sentence": stem, "option1": options[0], "option2": options[1]}
    elif task == "openbookqa":
        fields = {"question_stem": stem}
    else:  # ARC
        fields = {"question": stem}
    return Doc(task, fields, options, gold)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleanup (WikiHow markup), re-implemented."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_query(activity_label: str, ctx: str) -> str:
    """lm-eval's query, activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), from the
    dump's joined ctx: on ActivityNet items (WikiHow ones start "How to " and have no ctx_b),
    ctx_b is the lower-case fragment after the last sentence end."""
    if not ctx.startswith("How to "):
        m = re.fullmatch(r"(.*[.!?]) ([a-z][^.!?]*)", ctx, re.S)
        if m:
            ctx = f"{m.group(1)} {m.group(2).capitalize()}"
    return hellaswag_preprocess(f"{activity_label}: {ctx}")


# ----------------------------------------------------------------------------- requests


def requests(doc: Doc) -> tuple[list[tuple[str, str]], list[str]]:
    """lm-eval's (context, continuation) pair per option, and the strings whose lengths
    acc_norm divides by (lm-eval's doc_to_choice: the options, or winogrande's contexts)."""
    f, d = doc.fields, TARGET_DELIMITER
    if doc.task == "winogrande":
        s = f["sentence"]
        cut = s.index("_")
        contexts = [s[:cut] + o for o in doc.options]
        rest = d + s[cut + 1:].strip()
        return [(c, rest) for c in contexts], contexts
    if doc.task == "boolq":
        ctx = (f"{f['passage']}\n" if f["passage"] else "") + f"Question: {f['question']}?\nAnswer:"
    elif doc.task == "piqa":
        ctx = f"Question: {f['goal']}\nAnswer:"
    elif doc.task == "social_i_qa":
        ctx = f"Q: {f['question']}\nA:"
    elif doc.task == "hellaswag":
        ctx = hellaswag_query(f["activity_label"], f["ctx"])
    elif doc.task == "openbookqa":
        ctx = f["question_stem"]
    else:  # ARC
        ctx = f"Question: {f['question']}\nAnswer:"
    return [(ctx, d + o) for o in doc.options], list(doc.options)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal-LM encoding: the context's trailing spaces move to the continuation;
    the continuation's ids are those of context + continuation past the context's ids."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return list(ctx), list(whole[len(ctx):])


# ----------------------------------------------------------------------------- scoring


def _cand_class(n: int, most: int) -> int:
    return n if n <= 2 else most  # 1 (winogrande), 2 (boolq, piqa), else the most any has


def _len_class(n: int) -> int:
    return _round_up(length_bucket(max(n, 1), 8), 8)


def score_docs(model, tokenizer, docs: list[Doc], *, batch_size: int = 8,
               progress: bool = True) -> list[np.ndarray]:
    """Per doc, the summed log-prob of each option's continuation (float32).

    Rows (one per doc; one per option for winogrande) from all tasks are grouped by candidate
    count and continuation-length class and each group is one score_continuations call, so
    tasks with alike rows share compiled shapes."""
    rows = []  # (doc index, option index or None, context ids, [continuation ids])
    for i, doc in enumerate(docs):
        pairs, _ = requests(doc)
        enc = [encode_pair(tokenizer, c, k) for c, k in pairs]
        if doc.task == "winogrande":
            rows += [(i, j, ctx, [cont]) for j, (ctx, cont) in enumerate(enc)]
        else:
            rows.append((i, None, enc[0][0], [cont for _, cont in enc]))
    most = max([len(r[3]) for r in rows] + [1])
    groups: dict[tuple[int, int], list] = {}
    for r in rows:
        key = (_cand_class(len(r[3]), most), _len_class(max(len(t) for t in r[3])))
        groups.setdefault(key, []).append(r)
    # A group short of one batch joins the next longer one of its candidate count: one
    # compilation fewer for at most a batch of extra padding.
    keys = sorted(groups)
    for a, b in zip(keys, keys[1:]):
        if a[0] == b[0] and len(groups[a]) < batch_size:
            groups[b] = groups.pop(a) + groups[b]
    out = [np.zeros(len(d.options), np.float32) for d in docs]
    for (n_cand, cont_len), grp in sorted(groups.items()):
        scores = score_continuations(
            model, [r[2] for r in grp], [r[3] for r in grp], pad_id=_pad(tokenizer),
            batch_size=batch_size, min_candidates=n_cand,
            progress=f"zero-shot {n_cand}x{cont_len}" if progress else None)
        for (i, j, _, _), s in zip(grp, scores):
            if j is None:
                out[i][:] = s
            else:
                out[i][j] = s[0]
    return out


def parse_task(task: str, records: list[dict]) -> list[Doc]:
    return [parse_record(task, r, i) for i, r in enumerate(records)]


def summarize_zeroshot(task: str, docs: list[Doc], scores: list[np.ndarray]) -> dict:
    """acc / acc_norm (np.argmax: the first best, as lm-eval) and per-item predictions."""
    items = []
    for doc, s in zip(docs, scores):
        lengths = np.array([len(c) for c in requests(doc)[1]], np.float64)
        s64 = np.asarray(s, np.float64)
        items.append({"gold": doc.gold, "pred": int(np.argmax(s64)),
                      "pred_norm": int(np.argmax(s64 / lengths)), "scores": s64.tolist()})
    n = len(items)
    acc = sum(it["pred"] == it["gold"] for it in items) / n if n else 0.0
    acc_norm = sum(it["pred_norm"] == it["gold"] for it in items) / n if n else 0.0
    return {"task": task, "lm_eval_task": LM_EVAL_NAMES[task], "n": n, "acc": acc,
            "acc_norm": acc_norm, "items": items}


def evaluate_zeroshot(model, tokenizer, tasks: dict[str, list[dict]], *, batch_size: int = 8,
                      progress: bool = True) -> dict:
    """{"tasks": {task: {"acc", "acc_norm", "n", "items": [{gold, pred, pred_norm, scores}]}},
    "average": {"acc", "acc_norm"} (macro over tasks), "n"} over {task: LLM-Adapters records}.
    Every record is parsed before any is scored."""
    require_tokenizer(tokenizer, "evaluate_zeroshot")
    docs = {t: parse_task(t, recs) for t, recs in tasks.items()}
    flat = [d for ds in docs.values() for d in ds]
    scores = iter(score_docs(model, tokenizer, flat, batch_size=batch_size, progress=progress))
    results = {t: summarize_zeroshot(t, ds, [next(scores) for _ in ds]) for t, ds in docs.items()}
    return {"tasks": results, "average": zeroshot_average(results),
            "n": sum(r["n"] for r in results.values())}


def zeroshot_average(results: dict[str, dict]) -> dict:
    """Macro averages of acc and acc_norm over tasks."""
    return {k: float(np.mean([r[k] for r in results.values()])) if results else 0.0
            for k in ("acc", "acc_norm")}


def zeroshot_table(report: dict) -> str:
    """Per-task n, acc and acc_norm (starred where lm-eval reports it), and the average."""
    results = report["tasks"]
    w = max([len(t) for t in results] + [7])
    lines = [f"{'task':<{w}}  {'n':>5}  {'acc %':>6}  {'acc_norm %':>10}"]
    for t, r in results.items():
        star = "*" if t in LM_EVAL_ACC_NORM else " "
        lines.append(f"{t:<{w}}  {r['n']:>5}  {100 * r['acc']:>6.2f}  "
                     f"{100 * r['acc_norm']:>9.2f}{star}")
    avg = report["average"]
    lines.append(f"{'average':<{w}}  {report['n']:>5}  {100 * avg['acc']:>6.2f}  "
                 f"{100 * avg['acc_norm']:>10.2f}")
    lines.append("(* lm-eval reports acc_norm for this task; zero-shot, option texts scored)")
    return "\n".join(lines)
