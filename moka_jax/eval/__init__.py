"""Evaluation of a loaded model (moka_jax.load): commonsense reasoning (generate / choice),
response perplexity, MMLU k-shot, text generation, and the lm-evaluation-harness model."""

from moka_jax.eval.commonsense import (TASKS, average, evaluate_choice, evaluate_generate,
                                       evaluate_tasks, extract_answer, load_tasks, results_table,
                                       score_continuations)
from moka_jax.eval.mmlu import evaluate_mmlu, mmlu_table
from moka_jax.eval.perplexity import perplexity, response_nll, response_scores

__all__ = [
    "TASKS", "average", "evaluate_choice", "evaluate_generate", "evaluate_mmlu",
    "evaluate_tasks", "extract_answer", "load_tasks", "mmlu_table", "perplexity",
    "response_nll", "response_scores", "results_table", "score_continuations",
]
