"""Evaluation prompts end in exactly the tokens training saw up to the response, per template.

The reference is the training tokenisation itself (data.tokenize: ids, and labels = IGNORE on
the prompt), checked against what the evaluation really feeds the model: the rows passed to
generate() in generate mode, the context ids in choice mode. SmolLM2's byte-level BPE is the
tokenizer where this can fail (its pre-tokenizer merges trailing spaces with the next word).
"""

from pathlib import Path

import numpy as np
import pytest

from moka_jax import data as D
from moka_jax.eval import commonsense as cs

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = D.TEMPLATES  # every training template


@pytest.fixture(scope="module")
def smollm2_tok():
    """SmolLM2-135M-Instruct's tokenizer, read from the embedded GGUF (no model conversion)."""
    from transformers import AutoTokenizer

    from moka_jax.models.gguf import find_smollm2_gguf

    gguf = find_smollm2_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def records():
    tasks = cs.load_tasks(REPO / "data" / "commonsense", limit=2)
    out = [r for recs in tasks.values() for r in recs]
    out.append({**out[0], "input": "some context"})  # the with-input variant of each template
    return out


def training_prompts(tok, records, template):
    """(ids, number of masked prompt tokens) of each record as training tokenises it."""
    ids, labels = D.tokenize(records, tok, template=template, cutoff_len=4096, add_eos=False)
    n_prompt = [int(np.argmax(lab != D.IGNORE)) for lab in labels]
    for lab, n in zip(labels, n_prompt):
        assert (lab[:n] == D.IGNORE).all() and (lab[n:] != D.IGNORE).all()
    return ids, n_prompt


def fed_to_generate(monkeypatch, tok, records, template):
    """The unpadded token rows evaluate_generate passes to generate(), one per record."""
    import moka_jax.eval.generate as gen

    rows = []

    def fake_generate(model, ids_BT, mask_BT, **kw):
        rows.extend([int(t) for t in ids[mask]] for ids, mask in zip(ids_BT, mask_BT))
        return np.zeros((ids_BT.shape[0], 0), np.int32)

    monkeypatch.setattr(gen, "generate", fake_generate)
    r = cs.evaluate_generate(None, tok, "boolq", [{**x, "answer": "true"} for x in records],
                             template=template, batch_size=3, progress=False)
    assert r["parsed"] == 0 and r["parse_rate"] == 0.0  # empty outputs parse to nothing
    return rows


@pytest.mark.parametrize("template", TEMPLATES)
def test_generate_prompt_is_the_training_prompt(smollm2_tok, records, template, monkeypatch):
    tok = smollm2_tok
    ids, n_prompt = training_prompts(tok, records, template)
    want = [[int(t) for t in full[:n]] for full, n in zip(ids, n_prompt)]
    fed = fed_to_generate(monkeypatch, tok, records, template)
    # every prompt, in batches of 3: the short last batch is filled with a copy of its first
    assert len(fed) == -(-len(want) // 3) * 3
    assert {tuple(r) for r in fed} == {tuple(r) for r in want} and len(set(map(tuple, want))) == len(want)
    for r, full, n in zip(records, ids, n_prompt):  # ... and what follows is the response
        assert tok.decode(full[n:], skip_special_tokens=True).strip() == r["output"].strip()


@pytest.mark.parametrize("template", TEMPLATES)
def test_choice_context_is_the_training_prefix(smollm2_tok, records, template):
    tok = smollm2_tok
    ids, n_prompt = training_prompts(tok, records, template)
    for r, full, n in zip(records, ids, n_prompt):
        answer = r["output"].rsplit(" ", 1)[-1]
        ctx, (cont,) = cs.encode_choice(tok, cs.prompt_for(r, template, tok), [answer],
                                        template=template)
        assert ctx[:n] == [int(t) for t in full[:n]]
        assert ctx + cont == [int(t) for t in full[:len(ctx) + len(cont)]], template


def test_llm_adapters_boundary_is_repaired_not_merged(smollm2_tok, records):
    """Joint BPE would fuse the 16 trailing spaces with " the"; training instead keeps the
    prompt's own tokens and appends the response's, so the text is unchanged."""
    tok = smollm2_tok
    prompt, full = D.render(records[0], "llm-adapters")
    joint = tok(full)["input_ids"]
    alone = tok(prompt)["input_ids"]
    assert joint[:len(alone)] != alone  # the artefact exists for this tokenizer
    (ids,), _ = D.tokenize(records[:1], tok, template="llm-adapters", add_eos=False,
                           cutoff_len=4096)
    assert list(ids) == alone + tok(records[0]["output"], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == full
    # alpaca's boundary is clean: training ids are the joint tokenisation, unchanged
    (ids,), _ = D.tokenize(records[:1], tok, template="alpaca", add_eos=False, cutoff_len=4096)
    assert list(ids) == tok(D.render(records[0], "alpaca")[1])["input_ids"]


def test_llm_adapters_eval_string_stays_available(smollm2_tok, records):
    p = cs.prompt_for(records[0], "llm-adapters-eval")
    assert p.startswith("Below is an instruction") and p.endswith("### Response:\n" + " " * 16)
    assert p != D.render(records[0], "llm-adapters")[0]
    with pytest.raises(ValueError, match="choose one of"):
        cs.prompt_for(records[0], "alpaca-eval")
