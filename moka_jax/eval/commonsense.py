"""Commonsense reasoning on LLM-Adapters-format sets: generate-and-parse, or rank by likelihood.

    tasks = load_tasks("data/commonsense", ["boolq", "piqa"], limit=50)
    result = evaluate_choice(model, tokenizer, "boolq", tasks["boolq"])   # or evaluate_generate

Prompts: `template` is the training run's data.template (default "alpaca", the data default),
and the prompt's tokens are exactly the tokens the run was trained on up to the response
(data.encode_prompts / encode_pairs), so a fine-tuned model is asked in its own format.
"llm-adapters-eval" is LLM-Adapters' commonsense_evaluate.py string instead: it differs from
their finetune.py prompt (no indented blank lines, one trailing space) and its 16 trailing
spaces tokenise differently from any training text, so a model trained on either template meets
an unseen prompt ending; it is kept to reproduce their protocol, not as a default.

generate: up to 32 new tokens, first regex match of the task's answer pattern, exact match with
`answer` (LLM-Adapters' extract_answer); greedy, or beam search with num_beams (LLM-Adapters
used 4). Each result reports how many answers parsed ("parsed", "parse_rate").
choice: each candidate answer ("true" / "false", "answer1" ...) is scored as the summed
log-prob of its tokens after prompt + "the correct answer is" (the response format the
adapters are trained on), and the best one is the prediction: nothing to parse.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from moka_jax.data import (DataError, alpaca_prompt, encode_pairs, encode_prompts, load_records,
                            render_chat, require_tokenizer)
from moka_jax.models.llama import check_rows

# Answer patterns of LLM-Adapters' extract_answer (case-sensitive, first match wins).
TASK_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
}
TASKS = tuple(TASK_PATTERNS)
# Candidates when an instruction lacks its "Answer format: a/b/..." line.
DEFAULT_CANDIDATES = {
    "boolq": ("true", "false"), "piqa": ("solution1", "solution2"),
    "social_i_qa": ("answer1", "answer2", "answer3"),
    "hellaswag": ("ending1", "ending2", "ending3", "ending4"),
    "winogrande": ("option1", "option2"),
    "ARC-Easy": ("answer1", "answer2", "answer3", "answer4"),
    "ARC-Challenge": ("answer1", "answer2", "answer3", "answer4"),
    "openbookqa": ("answer1", "answer2", "answer3", "answer4"),
}
ANSWER_PREFIX = "the correct answer is"
MAX_CANDIDATES = max(len(re.findall(r"\w+", p)) for p in TASK_PATTERNS.values())

# LLM-Adapters commonsense_evaluate.py generate_prompt, byte for byte (it differs from their
# finetune.py prompt: one trailing space, blank lines without indentation).
_IND = " " * 16
EVAL_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n\n{_IND}### Input:\n{_IND}{{input}}\n\n"
    f"{_IND}### Response:\n{_IND}")
EVAL_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request. \n\n"
    f"{_IND}### Instruction:\n{_IND}{{instruction}}\n\n{_IND}### Response:\n{_IND}")
PROMPT_TEMPLATES = ("alpaca", "llm-adapters", "chat", "plain", "llm-adapters-eval")
DEFAULT_TEMPLATE = "alpaca"  # data.template's default: evaluate as the default run trains


def check_tasks(names) -> list[str]:
    unknown = [t for t in names if t not in TASK_PATTERNS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks: {', '.join(TASKS)}")
    return list(names)


def check_template(template: str) -> str:
    if template not in PROMPT_TEMPLATES:
        raise ValueError(f"prompt template {template!r}; choose one of {list(PROMPT_TEMPLATES)} "
                         "(the training run's data.template, or llm-adapters-eval)")
    return template


def prompt_for(record: dict, template: str = DEFAULT_TEMPLATE, tokenizer=None) -> str:
    """The text before the response: the training template's prompt (chat needs the
    tokenizer), or LLM-Adapters' evaluation string for "llm-adapters-eval"."""
    check_template(template)
    if template == "llm-adapters-eval":
        fmt = EVAL_PROMPT_INPUT if record.get("input") else EVAL_PROMPT_NO_INPUT
        return fmt.format(instruction=record["instruction"], input=record.get("input", ""))
    if template == "chat":
        return render_chat([record], tokenizer)[0][0]
    return alpaca_prompt(record["instruction"], record.get("input", ""), template)


def _data_template(template: str) -> str:
    """The data template whose tokenisation rules apply (the eval string is plain text)."""
    return "alpaca" if template == "llm-adapters-eval" else template


def extract_answer(task: str, text: str) -> str:
    """First match of the task's answer pattern in `text`, or "" (unparseable)."""
    found = re.findall(TASK_PATTERNS[task], text.strip())
    return found[0] if found else ""


def candidates(task: str, record: dict) -> tuple[str, ...]:
    """The answers offered by the record's "Answer format: a/b/c" line (ARC has 3-5)."""
    m = re.findall(r"Answer format:\s*([A-Za-z0-9/]+)", record["instruction"])
    if m:
        opts = tuple(o for o in m[-1].split("/") if o)
        if all(re.fullmatch(TASK_PATTERNS[task], o) for o in opts) and opts:
            return opts
    return DEFAULT_CANDIDATES[task]


def load_task(path, task: str, limit: int | None = None) -> list[dict]:
    """LLM-Adapters records (instruction, input, output, answer); the file and field on error."""
    records, fmt = load_records(path, "commonsense", limit)
    for i, r in enumerate(records):
        if not re.fullmatch(TASK_PATTERNS[task], r["answer"]):
            raise DataError(f"{path}: record {i}: field 'answer' = {r['answer']!r} is not a "
                            f"{task} answer (pattern {TASK_PATTERNS[task]})")
    return records


def load_tasks(root, tasks=TASKS, limit: int | None = None, split: str = "dev") -> dict:
    return {t: load_task(Path(root) / t / f"{split}.json", t, limit) for t in check_tasks(tasks)}


# ----------------------------------------------------------------------------- scoring


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def length_bucket(n: int, minimum: int = 32) -> int:
    """Smallest of 2^k, 1.5 * 2^k (>= minimum) holding n: few shapes, so few compilations,
    for at most a third of padding."""
    b = minimum
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return b


@partial(jax.jit, static_argnames=("graphdef",))
def _continuation_logprobs(graphdef, state, ctx_BT, ctx_mask_BT, cont_BCL, cont_mask_BCL):
    """(B, C) summed log-probs of each right-padded continuation after its left-padded context.

    The context is run once into the KV cache, which is then tiled over the C continuations.
    """
    model = nnx.merge(graphdef, state)
    b, c, l = cont_BCL.shape
    cache = model.init_cache(b, ctx_BT.shape[1] + l)
    # The head runs only where a continuation token is predicted: the context's last position
    # (for token 0) and the continuation's positions before its last (tokens 1..).
    x_BTD, cache = model.hidden(ctx_BT, ctx_mask_BT, cache=cache)
    first_BV = jax.nn.log_softmax(model.logits(x_BTD[:, -1]))
    tiled = jax.tree.map(lambda x: jnp.repeat(x, c, axis=0) if x.ndim >= 2 else x, cache)
    cont_NL, mask_NL = cont_BCL.reshape(b * c, l), cont_mask_BCL.reshape(b * c, l)
    x_NLD, _ = model.hidden(cont_NL, mask_NL, cache=tiled)
    prev_NLV = jnp.concatenate([jnp.repeat(first_BV, c, axis=0)[:, None],
                                jax.nn.log_softmax(model.logits(x_NLD[:, :-1]))], axis=1)
    tok_NL = jnp.take_along_axis(prev_NLV, cont_NL[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask_NL, tok_NL, 0.0), axis=-1).reshape(b, c)


def score_continuations(model, contexts: list[list[int]], conts: list[list[list[int]]], *,
                        pad_id: int = 0, batch_size: int = 8, min_candidates: int = 1,
                        progress: str | None = None) -> list[np.ndarray]:
    """Per example, the summed log-prob of each candidate continuation (token id lists).

    Shapes are rounded up (context to a length_bucket, continuation to 8, candidates to the
    max or min_candidates) and the last batch is filled with copies, so few compiled steps
    serve all batches, and, with a common min_candidates, all tasks.
    """
    check_rows(model.config, [[*ctx, *t] for ctx, c in zip(contexts, conts) for t in c] + [[pad_id]],
               "score_continuations", "shorten the contexts (fewer shots, a lower cutoff)")
    graphdef, state = nnx.split(model)
    n_cand = max(max(len(c) for c in conts), min_candidates)
    cont_len = _round_up(max(len(t) for c in conts for t in c), 8)
    order = np.argsort([len(c) for c in contexts], kind="stable")  # similar lengths together
    out = [None] * len(contexts)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc=progress, disable=progress is None, dynamic_ncols=True):
        idx = list(order[s:s + batch_size])
        rows = idx + [idx[0]] * (batch_size - len(idx))
        t = length_bucket(max(len(contexts[i]) for i in rows))
        ctx = np.full((batch_size, t), pad_id, np.int32)
        ctx_mask = np.zeros((batch_size, t), bool)
        cont = np.full((batch_size, n_cand, cont_len), pad_id, np.int32)
        cont_mask = np.zeros((batch_size, n_cand, cont_len), bool)
        for r, i in enumerate(rows):
            ids = contexts[i]
            ctx[r, t - len(ids):], ctx_mask[r, t - len(ids):] = ids, True
            for k, toks in enumerate(conts[i]):
                cont[r, k, :len(toks)], cont_mask[r, k, :len(toks)] = toks, True
        scores = np.asarray(_continuation_logprobs(graphdef, state, ctx, ctx_mask, cont,
                                                   cont_mask))
        for r, i in enumerate(idx):
            out[i] = scores[r, :len(conts[i])]
    return out


def encode_choice(tokenizer, prompt: str, options, prefix: str = ANSWER_PREFIX,
                  template: str = DEFAULT_TEMPLATE):
    """(context ids, [continuation ids]): context = prompt + prefix, tokenised as training
    tokenises prompt + response (data.encode_pairs); continuation = " " + option."""
    (ctx,), _ = encode_pairs(tokenizer, [prompt], [prompt + prefix], _data_template(template))
    sep = " " if prefix else ""
    return ctx, [tokenizer(sep + o, add_special_tokens=False)["input_ids"] for o in options]


def evaluate_choice(model, tokenizer, task: str, records: list[dict], *,
                    template: str = DEFAULT_TEMPLATE, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Accuracy of likelihood ranking; every record gets a prediction."""
    opts = [candidates(task, r) for r in records]
    enc = [encode_choice(tokenizer, prompt_for(r, template, tokenizer), o, template=template)
           for r, o in zip(records, opts)]
    # Every task padded to the most candidates any task has: the tasks share compiled shapes.
    scores = score_continuations(model, [c for c, _ in enc], [k for _, k in enc],
                                 pad_id=_pad(tokenizer), batch_size=batch_size,
                                 min_candidates=MAX_CANDIDATES,
                                 progress=f"{task} (choice)" if progress else None)
    preds = []
    for r, o, s in zip(records, opts, scores):
        pred = o[int(np.argmax(s))]
        preds.append({"instruction": r["instruction"], "answer": r["answer"], "pred": pred,
                      "scores": dict(zip(o, map(float, s))), "flag": pred == r["answer"]})
    return summarize(task, preds)


def evaluate_generate(model, tokenizer, task: str, records: list[dict], *, eos_token_ids=(),
                      template: str = DEFAULT_TEMPLATE, batch_size: int = 8,
                      max_new_tokens: int = 32, num_beams: int = 1,
                      progress: bool = True) -> dict:
    """Accuracy of greedy (num_beams 1) or beam-search decoding + the first answer-pattern
    match (LLM-Adapters protocol; they used 4 beams)."""
    prompts = [prompt_for(r, template, tokenizer) for r in records]
    texts = generate_texts(model, tokenizer, prompts, eos_token_ids=eos_token_ids,
                           batch_size=batch_size, max_new_tokens=max_new_tokens,
                           num_beams=num_beams, template=_data_template(template),
                           progress=f"{task} (generate)" if progress else None)
    preds = []
    for r, text in zip(records, texts):
        pred = extract_answer(task, text)
        preds.append({"instruction": r["instruction"], "answer": r["answer"],
                      "output_pred": text, "pred": pred, "flag": pred == r["answer"]})
    return summarize(task, preds)


def evaluate_tasks(model, tokenizer, tasks: dict[str, list[dict]], *, mode: str = "choice",
                   **kw) -> dict[str, dict]:
    """{task: result} of evaluate_choice or evaluate_generate (their keyword arguments pass
    through) over load_tasks' {task: records}."""
    require_tokenizer(tokenizer, "evaluate_tasks")
    fn = {"choice": evaluate_choice, "generate": evaluate_generate}[mode]
    return {t: fn(model, tokenizer, t, recs, **kw) for t, recs in tasks.items()}


def generate_texts(model, tokenizer, prompts, *, eos_token_ids=(), batch_size: int = 8,
                   max_new_tokens: int = 32, num_beams: int = 1, template: str = "alpaca",
                   progress: str | None = None) -> list[str]:
    """Greedy (num_beams 1) or beam-search continuations, batched with left padding and the
    KV cache. Prompts are tokenised as `template`'s training prompts (data.encode_prompts).
    A short last batch is filled with copies of its first prompt (which stop with it), so every
    batch reuses the compiled shapes of full ones."""
    from moka_jax.eval.generate import generate

    pad = _pad(tokenizer)
    ids = encode_prompts(tokenizer, prompts, template)
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = [None] * len(prompts)
    for s in tqdm(range(0, len(order), batch_size), desc=progress, disable=progress is None,
                  dynamic_ncols=True):
        idx = list(order[s:s + batch_size])
        rows = idx + [idx[0]] * (min(batch_size, len(order)) - len(idx))
        t = max(len(ids[i]) for i in idx)
        ids_BT = np.full((len(rows), t), pad, np.int32)
        mask_BT = np.zeros((len(rows), t), bool)
        for r, i in enumerate(rows):
            ids_BT[r, t - len(ids[i]):], mask_BT[r, t - len(ids[i]):] = ids[i], True
        new = generate(model, ids_BT, mask_BT, max_new_tokens=max_new_tokens,
                       eos_token_ids=eos_token_ids, pad_token_id=pad, num_beams=num_beams)
        for r, i in enumerate(idx):
            out[i] = tokenizer.decode(new[r], skip_special_tokens=True).strip()
    return out


def summarize(task: str, preds: list[dict]) -> dict:
    n = len(preds)
    correct = sum(p["flag"] for p in preds)
    unparsed = sum(p["pred"] == "" for p in preds)
    return {"task": task, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "unparseable": unparsed, "parsed": n - unparsed,
            "parse_rate": (n - unparsed) / n if n else 0.0, "predictions": preds}


def _pad(tokenizer) -> int:
    from moka_jax.data import pad_id
    return pad_id(tokenizer)


def results_table(results: dict[str, dict]) -> str:
    """Per-task accuracy, parsed share and unparseable count, and the macro average, as text."""
    w = max([len(t) for t in results] + [7])
    lines = [f"{'task':<{w}}  {'n':>5}  {'acc %':>6}  {'parsed %':>8}  {'unparsed':>8}"]
    for t, r in results.items():
        lines.append(f"{t:<{w}}  {r['n']:>5}  {100 * r['accuracy']:>6.2f}  "
                     f"{100 * r['parse_rate']:>8.2f}  {r['unparseable']:>8}")
    n = sum(r["n"] for r in results.values())
    unparsed = sum(r["unparseable"] for r in results.values())
    lines.append(f"{'average':<{w}}  {n:>5}  {100 * average(results):>6.2f}  "
                 f"{100 * (n - unparsed) / max(n, 1):>8.2f}  {unparsed:>8}")
    return "\n".join(lines)


def average(results: dict[str, dict]) -> float:
    """Macro average over tasks (as LLM-Adapters reports it)."""
    return float(np.mean([r["accuracy"] for r in results.values()])) if results else 0.0
