"""Response perplexity == exp(mean NLL of the response tokens) computed by hand."""

import json

import numpy as np
import pytest

from moka_jax.data import IGNORE, DataError, byte_tokenizer, tokenize
from moka_jax.eval.perplexity import perplexity
from tests.eval import ref_logprobs, tiny_model

RECORDS = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hi " * 9, "output": "hi"},
]


def test_perplexity_equals_exp_mean_nll_by_hand(tmp_path):
    tok, model = byte_tokenizer(), tiny_model()
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    got = perplexity(model, tok, path, batch_size=2, progress=False)

    ids, labels = tokenize([{**r, "input": r.get("input", "")} for r in RECORDS], tok)
    nll, n = 0.0, 0
    for x, lab, lp in zip(ids, labels, ref_logprobs(model, [list(x) for x in ids])):
        for t in range(1, len(x)):
            if lab[t] != IGNORE:
                nll -= lp[t - 1, lab[t]]
                n += 1
    assert got["tokens"] == n and got["examples"] == 3
    np.testing.assert_allclose(got["perplexity"], np.exp(nll / n), rtol=1e-5)


def test_wrong_format_names_file_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "q", "response": "r"}]))
    with pytest.raises(DataError, match=r"bad\.json: record 0: missing field 'output'"):
        perplexity(tiny_model(), byte_tokenizer(), path, progress=False)


def test_response_scores_per_example_and_greedy_flag_matches_greedy_decoding():
    """Per-example NLL equals the hand sum; "greedy" is True exactly when greedy decoding
    from the prompt reproduces the response (checked against moka_jax.eval.generate)."""
    from moka_jax.eval.perplexity import response_scores
    from moka_jax.eval.generate import generate

    model = tiny_model()
    prompts = [[1, 70, 71, 72], [1, 80, 81], [1, 90, 91, 92, 93, 94]]
    new = np.asarray(generate(model, np.array([[0] * (6 - len(p)) + p for p in prompts]),
                              np.array([[0] * (6 - len(p)) + [1] * len(p) for p in prompts]),
                              max_new_tokens=5))
    ids, labels = [], []
    for k, (p, g) in enumerate(zip(prompts, new)):
        resp = [int(t) for t in g]
        if k == 1:  # a response greedy decoding does not give: its last token changed
            resp[-1] = (resp[-1] + 1) % 200 + 3
        ids.append(np.array(p + resp, np.int32))
        labels.append(np.array([IGNORE] * len(p) + resp, np.int32))
    got = response_scores(model, ids, labels, batch_size=2)
    assert got["greedy"].tolist() == [True, False, True]
    assert got["tokens"].tolist() == [5, 5, 5]
    for k, lp in enumerate(ref_logprobs(model, [list(x) for x in ids])):
        want = -sum(lp[t - 1, labels[k][t]] for t in range(1, len(ids[k]))
                    if labels[k][t] != IGNORE)
        np.testing.assert_allclose(got["nll"][k], want, rtol=1e-5)


def test_packed_scores_equal_one_example_a_row():
    """Packed rows (several examples a row, head on labelled positions only) give each example
    the NLL, token count and greedy flag of the unpacked full-logits scorer."""
    from moka_jax.data import TokenizedData
    from moka_jax.data.batching import packed_plan
    from moka_jax.eval.perplexity import packed_response_scores, response_scores

    tok, model = byte_tokenizer(), tiny_model()
    recs = [{**r, "input": r.get("input", "")} for r in RECORDS] * 3
    recs[4] = {"instruction": "Echo", "input": "", "output": "ab"}
    ids, labels = tokenize(recs, tok)
    data = TokenizedData(ids, labels, np.zeros(len(ids), np.int64), ["x"])
    want = response_scores(model, ids, labels, batch_size=4)
    got = packed_response_scores(model, data, row_len=512, rows=2)
    plan, _ = packed_plan(data, 2, 512)
    assert max(len(row) for rows in plan for row in rows) >= 2   # rows do hold several
    np.testing.assert_array_equal(got["tokens"], want["tokens"])
    np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-5)
    np.testing.assert_array_equal(got["greedy"], want["greedy"])
