"""Evaluation of a loaded model (moka_jax.load): commonsense reasoning (generate / choice /
zero-shot), response perplexity, MMLU k-shot, text generation, and the lm-evaluation-harness
model."""

from moka_jax.eval.commonsense import (TASKS, average, evaluate_choice, evaluate_generate,
                                       evaluate_tasks, extract_answer, load_tasks, results_table,
                                       score_continuations)
from moka_jax.eval.mmlu import evaluate_mmlu, mmlu_table
from moka_jax.eval.perplexity import perplexity, response_nll, response_scores
from moka_jax.eval.zeroshot import evaluate_zeroshot, parse_record, zeroshot_table

__all__ = [
    "TASKS", "average", "evaluate_choice", "evaluate_generate", "evaluate_mmlu",
    "evaluate_tasks", "evaluate_zeroshot", "extract_answer", "load_tasks", "mmlu_table",
    "parse_record", "perplexity", "response_nll", "response_scores", "results_table",
    "score_continuations", "zeroshot_table",
]
