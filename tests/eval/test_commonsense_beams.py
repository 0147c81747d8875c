"""Beam search through the commonsense eval and eval.py's --beams (the search itself is checked
against transformers in tests/test_generate.py)."""

import numpy as np
import pytest

from moka_jax.eval import commonsense as cs
from moka_jax.eval.generate import beam_search

PROMPTS = ["Q: sky?\nA:", "Q: is the sea wet?\nA:", "Hi"]


def test_generate_texts_beams_batched_equals_unbatched_and_beam_search(model, tok):
    kw = dict(eos_token_ids=(2,), max_new_tokens=6, num_beams=2)
    one = cs.generate_texts(model, tok, PROMPTS, batch_size=1, **kw)
    many = cs.generate_texts(model, tok, PROMPTS, batch_size=3, **kw)
    assert one == many
    # Prompt 0's 2-beam answer differs from its greedy one on this model.
    ids = tok(PROMPTS[0])["input_ids"]
    new = beam_search(model, np.asarray([ids]), num_beams=2, max_new_tokens=6, eos_token_ids=(2,),
                      pad_token_id=cs._pad(tok))
    assert one[0] == tok.decode(new[0], skip_special_tokens=True).strip()


def test_evaluate_generate_takes_num_beams(model, tok):
    rec = {"instruction": "Is the sky blue?\n\nAnswer format: true/false", "input": "",
           "output": "the correct answer is true", "answer": "true"}
    r = cs.evaluate_generate(model, tok, "boolq", [rec], eos_token_ids=(2,), max_new_tokens=4,
                             num_beams=2, progress=False)
    assert r["n"] == 1 and r["predictions"][0]["pred"] == cs.extract_answer(
        "boolq", r["predictions"][0]["output_pred"])


def test_eval_cli_beams_flag(capsys):
    import eval as eval_cli

    assert eval_cli.parse_args(["--mode", "generate", "--beams", "4"]).beams == 4
    assert eval_cli.parse_args([]).beams == 1
    for bad, msg in ((["--mode", "generate", "--beams", "0"], "--beams: 0, expected >= 1"),
                     (["--beams", "4"], "--mode generate only")):
        with pytest.raises(SystemExit):
            eval_cli.parse_args(bad)
        assert msg in capsys.readouterr().err
