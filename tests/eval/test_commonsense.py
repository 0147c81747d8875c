"""Commonsense eval: answer parsing, likelihood ranking vs numpy, padding invariance, errors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moka_jax.data import DataError
from moka_jax.eval import commonsense as cs
from moka_jax.io.attach import (AdapterMismatch, attach_exported_adapter, check_adapter_base,
                                   precheck_adapter_shapes)
from tests.eval import ref_logprobs, tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[2]


def rec(task, question, fmt, answer):
    return {"instruction": f"{question}\n\nAnswer format: {fmt}", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


RECORDS = [
    rec("boolq", "Please answer with true or false: is the sky blue?", "true/false", "true"),
    rec("ARC-Easy", "Pick one. Answer1: a Answer2: b Answer3: c Answer4: d Answer5: e",
        "answer1/answer2/answer3/answer4/answer5", "answer5"),
    rec("ARC-Easy", "Pick. Answer1: x Answer2: y Answer3: z", "answer1/answer2/answer3", "answer2"),
    rec("ARC-Easy", "A much longer question " * 6 + "Answer1: p Answer2: q Answer3: r Answer4: s",
        "answer1/answer2/answer3/answer4", "answer1"),
]


@pytest.mark.parametrize("task,text,expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false, then true", "false"),
    ("boolq", "The answer is True", ""),            # case-sensitive, as LLM-Adapters
    ("piqa", "  solution2 is right; solution1 not", "solution2"),
    ("social_i_qa", "I think answer3.", "answer3"),
    ("hellaswag", "ending4", "ending4"),
    ("hellaswag", "answer2", ""),
    ("winogrande", "option2 fits the blank", "option2"),
    ("ARC-Easy", "the correct answer is answer5", "answer5"),
    ("ARC-Challenge", "answer12", "answer1"),        # first regex match, not a whole word
    ("openbookqa", "no idea", ""),
])
def test_extract_answer(task, text, expected):
    assert cs.extract_answer(task, text) == expected


def test_candidates_from_answer_format_line():
    assert cs.candidates("ARC-Easy", RECORDS[1]) == tuple(f"answer{i}" for i in range(1, 6))
    assert cs.candidates("ARC-Easy", RECORDS[2]) == ("answer1", "answer2", "answer3")
    assert cs.candidates("piqa", {"instruction": "no format line"}) == ("solution1", "solution2")


def test_eval_prompt_is_llm_adapters_evaluate_prompt():
    p = cs.prompt_for({"instruction": "Q?", "input": ""}, "llm-adapters-eval")
    assert p == ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request. \n\n                ### Instruction:\n"
                 "                Q?\n\n                ### Response:\n                ")


def test_choice_scores_equal_numpy_logprobs(model, tok):
    """Summed candidate log-probs == a direct computation on the unpadded sequence."""
    enc = [cs.encode_choice(tok, cs.prompt_for(r), cs.candidates("ARC-Easy", r))
           for r in RECORDS[1:]]
    got = cs.score_continuations(model, [c for c, _ in enc], [k for _, k in enc], batch_size=2)
    refs = iter(ref_logprobs(model, [ctx + c for ctx, conts in enc for c in conts]))
    for (ctx, conts), scores in zip(enc, got):
        assert len(scores) == len(conts)
        for cont, s in zip(conts, scores):
            lp = next(refs)
            want = sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))
            np.testing.assert_allclose(s, want, rtol=1e-4, atol=1e-4)


def test_choice_batched_equals_unbatched(model, tok):
    recs = RECORDS[1:]
    one = cs.evaluate_choice(model, tok, "ARC-Easy", recs, batch_size=1, progress=False)
    many = cs.evaluate_choice(model, tok, "ARC-Easy", recs, batch_size=4, progress=False)
    for a, b in zip(one["predictions"], many["predictions"]):
        assert a["pred"] == b["pred"]
        np.testing.assert_allclose(list(a["scores"].values()), list(b["scores"].values()),
                                   rtol=1e-4, atol=1e-4)
    assert one["unparseable"] == 0 and one["n"] == 3


def test_generate_batched_equals_unbatched(model, tok):
    # Short prompts of different lengths: one prefill bucket, so few compilations.
    prompts = ["Q: sky?\nA:", "Q: is the sea wet?\nA:", "Q: 2+2?\nA:", "Hi"]
    kw = dict(eos_token_ids=(2,), max_new_tokens=6)
    one = cs.generate_texts(model, tok, prompts, batch_size=1, **kw)
    many = cs.generate_texts(model, tok, prompts, batch_size=4, **kw)
    assert one == many


def test_generate_short_last_batch_is_filled_to_the_compiled_shape(model, tok, monkeypatch):
    import moka_jax.eval.generate as gen

    rows, real = [], gen.generate
    monkeypatch.setattr(gen, "generate", lambda m, ids, *a, **k: rows.append(len(ids))
                        or real(m, ids, *a, **k))
    prompts = ["Q: sky?\nA:", "Q: is the sea wet?\nA:", "Q: 2+2?\nA:", "Hi", "Q: red?\nA:"]
    kw = dict(eos_token_ids=(2,), max_new_tokens=5)
    filled = cs.generate_texts(model, tok, prompts, batch_size=3, **kw)
    assert rows == [3, 3]  # 5 prompts: the second batch holds 2 and one filler copy
    monkeypatch.setattr(gen, "generate", real)
    assert filled == cs.generate_texts(model, tok, prompts, batch_size=1, **kw)


def test_evaluate_generate_counts_unparseable(model, tok):
    r = cs.evaluate_generate(model, tok, "boolq", RECORDS[:1], eos_token_ids=(2,),
                             max_new_tokens=4, progress=False)
    p = r["predictions"][0]
    assert p["pred"] == cs.extract_answer("boolq", p["output_pred"])
    assert r["unparseable"] == (p["pred"] == "")
    assert r["parsed"] == 1 - r["unparseable"] and r["parse_rate"] == r["parsed"] / r["n"]
    table = cs.results_table({"boolq": r})
    assert "boolq" in table and "average" in table and "parsed %" in table
    assert f"{100 * r['parse_rate']:.2f}" in table.splitlines()[1]


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: boolq, piqa"):
        cs.check_tasks(["boolq", "copa"])


def test_wrong_format_file_names_file_and_field(tmp_path):
    bad = tmp_path / "boolq" / "dev.json"
    bad.parent.mkdir()
    bad.write_text(json.dumps([{"instruction": "q", "input": "", "output": "o"}]))
    with pytest.raises(DataError, match=r"dev\.json.*'answer'"):
        cs.load_tasks(tmp_path, ["boolq"])
    bad.write_text(json.dumps([{"instruction": "q", "input": "", "output": "o", "answer": "yes"}]))
    with pytest.raises(DataError, match=r"dev\.json: record 0: field 'answer' = 'yes'"):
        cs.load_tasks(tmp_path, ["boolq"])


def test_shipped_dev_sets_parse():
    tasks = cs.load_tasks(REPO / "data" / "commonsense", limit=20)
    for task, records in tasks.items():
        for r in records:
            assert r["answer"] in cs.candidates(task, r), (task, r["instruction"][-80:])


# ----------------------------------------------------------------------------- adapters


def export_adapter(tmp_path, targets=r"(q_proj|v_proj)$", base=None):
    from flax import nnx

    from moka_jax import nn
    from moka_jax.adapters import LoRAConfig, adapter_config_to_dict
    from moka_jax.io.adapter_format import write_adapter

    m = tiny_model()
    cfg = LoRAConfig(r=2, alpha=4)
    nn.attach_adapters(m, cfg, targets, rngs=nnx.Rngs(0))
    state = nn.adapter_state(m)
    state = nnx.to_pure_dict(state)
    return write_adapter(tmp_path / "adapter", state, adapter_config=adapter_config_to_dict(cfg),
                         targets=targets, base=base or {"path": "x", "quant": "none",
                                                        "tiny": None}, overwrite=True)


def test_adapter_roundtrip_and_shape_mismatch(tmp_path):
    from moka_jax.io.adapter_format import read_adapter_meta

    adir = export_adapter(tmp_path)
    paths = attach_exported_adapter(tiny_model(seed=1), adir)
    assert paths == [f"layers/{i}/attn/{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    meta = read_adapter_meta(adir)
    with pytest.raises(AdapterMismatch, match=r"q_proj.*checkpoint \[2, 32.*model \[2, 48"):
        precheck_adapter_shapes(tiny_config(hidden=48), meta, adir)
    with pytest.raises(AdapterMismatch, match="not in the checkpoint"):
        attach_exported_adapter(tiny_model(layers=3), adir)


def test_eval_prompts_in_the_adapters_training_template(tmp_path):
    from moka_jax.cli import eval as eval_cli
    from moka_jax.io.adapter_format import read_adapter_meta

    adir = export_adapter(tmp_path)
    assert "data" not in read_adapter_meta(adir) and eval_cli.training_template(adir) == "alpaca"
    assert eval_cli.training_template(None) == cs.DEFAULT_TEMPLATE == "alpaca"
    import json
    from safetensors.numpy import load_file, save_file
    meta = read_adapter_meta(adir)
    meta["data"] = {"template": "llm-adapters"}
    save_file(load_file(str(adir / "adapter.safetensors")), str(adir / "adapter.safetensors"),
              metadata={"moka_jax": json.dumps(meta)})
    assert eval_cli.training_template(adir) == "llm-adapters"


def test_adapter_targets_matching_nothing(tmp_path):
    adir = export_adapter(tmp_path, targets=r"layers/1/attn/q_proj$")
    from moka_jax.io.adapter_format import read_adapter_meta

    meta = read_adapter_meta(adir)
    meta["targets"] = r"layers/7/attn/q_proj$"
    with pytest.raises(AdapterMismatch, match="matches no Linear layer"):
        precheck_adapter_shapes(tiny_config(), meta, adir)


def test_adapter_base_mismatch_names_the_field(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, hidden in ((a, 576), (b, 960)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"hidden_size": hidden, "vocab_size": 49152}))
    with pytest.raises(AdapterMismatch, match="hidden_size: adapter base 576 vs model 960"):
        check_adapter_base({"base": {"path": str(a), "quant": "nf4", "tiny": None}}, b, "nf4")
    with pytest.raises(AdapterMismatch, match="random tiny model"):
        check_adapter_base({"base": {"path": "random", "tiny": {"hidden": 64}}}, b, "nf4")
    check_adapter_base({"base": {"path": str(b), "quant": "nf4", "tiny": None}}, b, "nf4")


# ----------------------------------------------------------------------------- real model


def test_cli_smollm2_choice(tmp_path, capsys):
    """The CLI end to end on the real SmolLM2 (default cache), 4 boolq items."""
    from moka_jax.models.gguf import is_complete, smollm2_cache_dir

    if not is_complete(smollm2_cache_dir()) and os.environ.get("MOKA_SKIP_SLOW"):
        pytest.skip("SmolLM2 not converted yet")
    from moka_jax.cli import eval as eval_cli

    out = tmp_path / "preds.json"
    assert eval_cli.main(["--tasks", "boolq", "--limit", "4", "--batch-size", "4",
                          "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    r = report["tasks"]["boolq"]
    assert r["n"] == 4 and r["unparseable"] == 0 and len(r["predictions"]) == 4
    assert all(p["pred"] in ("true", "false") for p in r["predictions"])
    assert "boolq" in capsys.readouterr().out
    assert eval_cli.main(["--tasks", "copa"]) == 2
    assert "valid tasks" in capsys.readouterr().err
    # A tiny model's adapter is refused from the config alone, before SmolLM2 is loaded.
    adir = export_adapter(tmp_path)
    with pytest.warns(UserWarning, match="only the adapter shapes can be checked"):
        assert eval_cli.main(["--tasks", "boolq", "--adapter", str(adir)]) == 2
    err = capsys.readouterr().err
    assert "does not match" in err and "checkpoint [2, 32] vs model [2, 576]" in err
