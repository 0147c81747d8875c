"""Zero-shot (lm-eval style) multiple choice: parsing real dev records into lm-eval's fields,
its context / continuation strings, scores and acc / acc_norm against a numpy reference."""

import json
from pathlib import Path

import numpy as np
import pytest

from moka_jax.data import DataError
from moka_jax.eval import zeroshot as zs
from tests.eval import ref_logprobs

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data" / "commonsense"


def dev(task, index):
    return json.loads((DATA / task / "dev.json").read_text())[index]


# Hand-written from reading the records and lm-eval 0.4.13's task YAMLs: (task, dev index) ->
# fields, option texts, gold index, and lm-eval's (context, continuation) per option.
HELLA0_CTX = ("Personal Care and Style: How to paint jeans. Cover your work area. Protect your "
              "surfaces from the paint or it may stain them. Make sure to cover a large area.")
HELLA0_ENDINGS = (
    "You will be splattering the paint onto your jeans and it is likely to splatter all around "
    "your jeans as well. Lay out your tarp or newspapers to cover the area you will be working "
    "on.",
    "You might want to put out a tarp or blanket for added protection. Do not make the area "
    "wet; any paint sitting around your work area could stain your floor.",
    "A single spill can permanently stain denim if it gets onto your skin, so make sure to have "
    "everything else covered. Get accumulation of lots of cleaning substances underneath your "
    "work surface.",
    "Cover the top areas of your work area with paper towels or another material. Use "
    "painter's tape or duct tape.")
HELLA3_ENDINGS = (
    "collaborate to mix the bag and some other ingredients in a large bowl.",
    "girls begin move the girl on the chair and then the one on the chair exercises along with "
    "her while she talks.",
    "women begin cooking something into a pan, then around the food, having it made straight "
    "out from scratch.",
    "girls serve a sandwich, then, the two girl and one put sheet cake on the table.")
WINO = ("If our relationship just started, should I get her a card or gift for Christmas? She "
        "might think I'm cheap if I give the _ .")
WINO_PREFIX = ("If our relationship just started, should I get her a card or gift for "
               "Christmas? She might think I'm cheap if I give the ")
ARC_C0 = ("Four significantly different household appliances (blender, mixer, toaster, and food "
          "processor) are plugged into four outlets along a counter. Turning on or off one or "
          "more of the appliances does not affect the performance of the other appliances "
          "because the four appliances")

EXPECTED = {
    ("boolq", 0): dict(
        fields={"passage": "", "question": "is there a right and left brachiocephalic artery"},
        options=("no", "yes"), gold=0,
        context="Question: is there a right and left brachiocephalic artery?\nAnswer:"),
    ("piqa", 0): dict(
        fields={"goal": "Kill fruit flies easily.", "sol1": "Spray with alcohol, then sweep away.",
                "sol2": "Spray with water, then sweep away."},
        options=("Spray with alcohol, then sweep away.", "Spray with water, then sweep away."),
        gold=0, context="Question: Kill fruit flies easily.\nAnswer:"),
    ("social_i_qa", 0): dict(
        fields={"question": "taylor just got hired but he was already best friends with a "
                            "co-worker. How would Others feel as a result?"},
        options=("happy", "ready to work", "jealous"), gold=2,
        context="Q: taylor just got hired but he was already best friends with a co-worker. "
                "How would Others feel as a result?\nA:"),
    ("hellaswag", 0): dict(  # WikiHow: no ctx_b to capitalise
        fields={"activity_label": "Personal Care and Style",
                "ctx": HELLA0_CTX.split(": ", 1)[1]},
        options=HELLA0_ENDINGS, gold=0, context=HELLA0_CTX),
    ("hellaswag", 3): dict(  # ActivityNet: ctx_b "the two" capitalised as lm-eval does
        fields={"activity_label": "Baking cookies",
                "ctx": "Two young girls stand in a kitchen, with one holding a bag of something "
                       "and talking and the other standing on a chair. the two"},
        options=HELLA3_ENDINGS, gold=0,
        context="Baking cookies: Two young girls stand in a kitchen, with one holding a bag of "
                "something and talking and the other standing on a chair. The two"),
    ("winogrande", 0): dict(
        fields={"sentence": WINO, "option1": "card", "option2": "gift"},
        options=("card", "gift"), gold=0,
        pairs=[(WINO_PREFIX + "card", " ."), (WINO_PREFIX + "gift", " .")]),
    ("ARC-Easy", 170): dict(
        fields={"question": "What gas in the air do we need to breathe in order to live?"},
        options=("nitrogen", "oxygen", "carbon dioxide", "hydrogen", "water vapor"), gold=1,
        context="Question: What gas in the air do we need to breathe in order to live?\nAnswer:"),
    ("ARC-Challenge", 0): dict(
        fields={"question": ARC_C0},
        options=("run on a direct current.", "are connected in series.",
                 "are connected in parallel.", "run on an alternating current."), gold=2,
        context=f"Question: {ARC_C0}\nAnswer:"),
    ("openbookqa", 1): dict(
        fields={"question_stem": "What happens as water levels rise?"},
        options=("fish swim more", "homes are built", "land is taller", "beaches shrink"),
        gold=3, context="What happens as water levels rise?"),
}


def expected_pairs(e):
    return e.get("pairs") or [(e["context"], " " + o) for o in e["options"]]


@pytest.mark.parametrize("task,index", list(EXPECTED))
def test_real_records_parse_to_lm_eval_fields_and_strings(task, index):
    e = EXPECTED[(task, index)]
    doc = zs.parse_record(task, dev(task, index), index)
    assert doc.task == task
    assert doc.fields == e["fields"]
    assert doc.options == e["options"]
    assert doc.gold == e["gold"]
    pairs, norm_strings = zs.requests(doc)
    assert pairs == expected_pairs(e)
    # acc_norm's divisors: lm-eval's doc_to_choice strings (winogrande: the contexts).
    want_norm = [c for c, _ in e["pairs"]] if "pairs" in e else list(e["options"])
    assert norm_strings == want_norm


def test_every_shipped_dev_record_parses():
    for task in zs.ZEROSHOT_TASKS:
        records = json.loads((DATA / task / "dev.json").read_text())
        docs = zs.parse_task(task, records)
        assert len(docs) == len(records) == 200
        for r, d in zip(records, docs):
            n = r["instruction"].rsplit("Answer format: ", 1)[1].count("/") + 1
            assert len(d.options) == n and all(d.options) and 0 <= d.gold < n
            assert not any(o != o.strip() for o in d.options)


def _lm_eval_yaml(rel):
    """A task YAML of the installed lm-eval, with !function tags kept as their text."""
    yaml = pytest.importorskip("yaml")
    lm_eval = pytest.importorskip("lm_eval")

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((Path(lm_eval.__file__).parent / "tasks" / rel).read_text(), Loader)


@pytest.mark.parametrize("task,yaml_path,doc", [
    ("piqa", "piqa/piqa.yaml", lambda d: {"goal": d.fields["goal"], "sol1": d.options[0],
                                          "sol2": d.options[1]}),
    ("social_i_qa", "siqa/siqa.yaml", None),
    ("ARC-Challenge", "arc/arc_easy.yaml",
     lambda d: {"question": d.fields["question"], "choices": {"text": list(d.options)}}),
    ("openbookqa", "openbookqa/openbookqa.yaml",
     lambda d: {"question_stem": d.fields["question_stem"], "choices": {"text": list(d.options)}}),
])
def test_contexts_match_lm_eval_templates(task, yaml_path, doc):
    """The installed lm-eval's own doc_to_text / doc_to_choice, rendered on the parsed fields."""
    from lm_eval.utils import apply_template

    cfg = _lm_eval_yaml(yaml_path)
    assert cfg.get("target_delimiter", " ") == zs.TARGET_DELIMITER
    index = next(i for t, i in EXPECTED if t == task)
    d = zs.parse_record(task, dev(task, index), index)
    pairs, _ = zs.requests(d)
    if task == "social_i_qa":  # lm-eval joins context and question with the one space
        context, question = d.fields["question"].rsplit(". ", 1)
        lm_doc = {"context": context + ".", "question": question,
                  "answerA": d.options[0], "answerB": d.options[1], "answerC": d.options[2]}
    else:
        lm_doc = doc(d)
    text = cfg["doc_to_text"]
    ctx = apply_template(text, lm_doc) if "{{" in text else lm_doc[text]
    choices = apply_template(cfg["doc_to_choice"], lm_doc)
    assert [c for c, _ in pairs] == [ctx] * len(d.options)
    assert [" " + c for c in eval(choices)] == [k for _, k in pairs]  # noqa: S307 (a list literal)


def test_boolq_template_matches_lm_eval_with_the_passage_left_out():
    cfg = _lm_eval_yaml("super_glue/boolq/default.yaml")
    assert cfg["doc_to_text"] == "{{passage}}\nQuestion: {{question}}?\nAnswer:"
    assert cfg["doc_to_choice"] == ["no", "yes"]
    doc = zs.Doc("boolq", {"passage": "The sky is blue.", "question": "is the sky blue"},
                 ("no", "yes"), 1)
    assert zs.requests(doc)[0][0] == ("The sky is blue.\nQuestion: is the sky blue?\nAnswer:",
                                      " no")


def test_hellaswag_preprocess_matches_lm_eval():
    import importlib.util

    lm_eval = pytest.importorskip("lm_eval")
    path = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py"
    spec = importlib.util.spec_from_file_location("lm_eval_hellaswag_utils", path)
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    raw = " Travel: [header] How to become an au pair [title] Learn the language. [step] Read. "
    assert zs.hellaswag_preprocess(raw) == utils.preprocess(raw)
    assert zs.hellaswag_preprocess(raw) == ("Travel: How to become an au pair. Learn the "
                                            "language. Read.")
    # ActivityNet: "{label}: " + ctx_a + " " + ctx_b.capitalize() (the rest of ctx_b lowered).
    assert zs.hellaswag_query("Hurling", "A man runs. then the Crowd") == \
        "Hurling: A man runs. Then the crowd"
    assert zs.hellaswag_query("Health", "How to rest. sleep well") == \
        "Health: How to rest. sleep well"  # WikiHow: ctx_b is empty


def test_winogrande_matches_lm_eval_partial_evaluation():
    import importlib.util

    lm_eval = pytest.importorskip("lm_eval")
    path = Path(lm_eval.__file__).parent / "tasks" / "winogrande" / "preprocess_winogrande.py"
    spec = importlib.util.spec_from_file_location("lm_eval_wino", path)
    wino = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wino)
    record = dev("winogrande", 2)
    d = zs.parse_record("winogrande", record, 2)
    lm_doc = {"sentence": d.fields["sentence"], "option1": d.fields["option1"],
              "option2": d.fields["option2"], "answer": record["answer"][-1]}
    pairs, norm = zs.requests(d)
    assert [c for c, _ in pairs] == wino.doc_to_choice(lm_doc) == norm
    assert {k for _, k in pairs} == {" " + wino.doc_to_target(lm_doc)}
    assert d.gold == wino.doc_to_text(lm_doc) == 1


def test_encode_pair_moves_trailing_space_and_splits_the_whole(tok):
    ctx, cont = zs.encode_pair(tok, "Answer: ", "yes")
    assert ctx == [b + 3 for b in b"Answer:"] and cont == [b + 3 for b in b" yes"]


def test_acc_norm_divides_by_option_characters_without_the_delimiter():
    # Raw: option 1. Per character of the option text: -4/4 > -3/2, option 0 (per UTF-8 byte
    # it would be option 1: -3/4 > -4/4; with the delimiter counted, 1: -3/3 > -4/5 is false).
    doc = zs.Doc("ARC-Easy", {"question": "q"}, ("abcd", "éé"), 0)
    r = zs.summarize_zeroshot("ARC-Easy", [doc], [np.array([-4.0, -3.0], np.float32)])
    assert r["items"] == [{"gold": 0, "pred": 1, "pred_norm": 0, "scores": [-4.0, -3.0]}]
    assert (r["acc"], r["acc_norm"], r["n"]) == (0.0, 1.0, 1)
    # The delimiter is not counted: "a" (1) vs "bbb" (3): -2/1 < -5/3, so option 1.
    doc = zs.Doc("piqa", {"goal": "g", "sol1": "a", "sol2": "bbb"}, ("a", "bbb"), 1)
    r = zs.summarize_zeroshot("piqa", [doc], [np.array([-2.0, -5.0], np.float32)])
    assert (r["items"][0]["pred"], r["items"][0]["pred_norm"]) == (0, 1)
    # Winogrande: lm-eval's choices are the per-option contexts ("I like " + option).
    doc = zs.Doc("winogrande", {"sentence": "I like _ .", "option1": "tea", "option2": "coffee"},
                 ("tea", "coffee"), 1)
    r = zs.summarize_zeroshot("winogrande", [doc], [np.array([-10.0, -11.0], np.float32)])
    assert (r["items"][0]["pred"], r["items"][0]["pred_norm"]) == (0, 1)  # -10/10 < -11/13


def _ids(text):
    return [b + 3 for b in text.encode("utf-8")]  # the byte tokenizer, independently


def test_scores_and_accuracy_equal_numpy_reference(model, tok, monkeypatch):
    keys = list(EXPECTED)
    tasks = {}
    for t, i in keys:
        tasks.setdefault(t, []).append(dev(t, i))
    calls = []
    real = zs.score_continuations
    monkeypatch.setattr(zs, "score_continuations",
                        lambda m, ctx, conts, **kw: calls.append((len(ctx), kw["min_candidates"]))
                        or real(m, ctx, conts, **kw))
    report = zs.evaluate_zeroshot(model, tok, tasks, batch_size=4, progress=False)

    # numpy: summed log-probs of each continuation's bytes after its context, one plain
    # forward over context + continuation.
    rows = [(k, _ids(ctx), _ids(cont)) for k in keys for ctx, cont in expected_pairs(EXPECTED[k])]
    want = {k: [] for k in keys}
    for (k, ctx, cont), lp in zip(rows, ref_logprobs(model, [c + k_ for _, c, k_ in rows])):
        want[k].append(sum(lp[len(ctx) - 1 + j, t] for j, t in enumerate(cont)))

    got_items = {t: iter(r["items"]) for t, r in report["tasks"].items()}
    accs = {}
    for k in keys:
        e, item = EXPECTED[k], next(got_items[k[0]])
        np.testing.assert_allclose(item["scores"], want[k], rtol=1e-5)
        ref = np.array(want[k])
        lengths = np.array([len(c) for c in ([c for c, _ in e["pairs"]] if "pairs" in e
                                             else e["options"])])
        assert item["gold"] == e["gold"]
        assert item["pred"] == int(np.argmax(ref))
        assert item["pred_norm"] == int(np.argmax(ref / lengths))
        accs.setdefault(k[0], []).append((item["pred"] == e["gold"],
                                          item["pred_norm"] == e["gold"]))
    for t, hits in accs.items():
        r = report["tasks"][t]
        assert r["n"] == len(hits)
        assert r["acc"] == np.mean([a for a, _ in hits])
        assert r["acc_norm"] == np.mean([b for _, b in hits])
    for metric in ("acc", "acc_norm"):
        assert report["average"][metric] == pytest.approx(
            np.mean([r[metric] for r in report["tasks"].values()]))
    assert report["n"] == len(keys)
    # Rows pooled across tasks by candidate count (1: winogrande's two, one per option; 2: boolq
    # and piqa; else the most any row has, 5 for ARC-Easy 170), groups short of a batch merged
    # into the next longer one until a batch (4) is full: four scoring calls for eight tasks.
    assert calls == [(2, 1), (2, 2), (4, 5), (2, 5)]
    table = zs.zeroshot_table(report)
    assert "hellaswag" in table and "average" in table and "acc_norm %" in table


@pytest.mark.parametrize("task,change,match", [
    ("piqa", lambda r: {**r, "instruction": r["instruction"].replace("Solution2: ", "Sol2: ")},
     r"piqa record 7: the 2 options 'Solution1: \.\.\.'\\n\\n'Solution2"),
    ("winogrande", lambda r: {**r, "instruction": r["instruction"].replace(" _ ", " ")},
     r"winogrande record 7: one blank '_' in the sentence not found \(0 found\)"),
    ("ARC-Easy", lambda r: {**r, "answer": "answer9"},
     r"ARC-Easy record 7: answer 'answer9' is not one of answer1\.\.answer4"),
    ("boolq", lambda r: {**r, "instruction": "Is it? true or false"},
     r"boolq record 7: the boolq opening .* not found \(instruction 'Is it\? true or false'\)"),
    ("hellaswag",
     lambda r: {**r, "instruction": r["instruction"].rsplit("\n\nAnswer format", 1)[0]},
     r"hellaswag record 7: no 'Answer format: x1/x2/\.\.\.' line at the end"),
    ("openbookqa", lambda r: {k: v for k, v in r.items() if k != "instruction"},
     r"openbookqa record 7: no 'instruction' string"),
])
def test_malformed_record_names_task_index_and_what_is_missing(task, change, match):
    with pytest.raises(DataError, match=match):
        zs.parse_record(task, change(dev(task, 0)), 7)


def test_evaluate_parses_everything_before_scoring(model, tok):
    bad = {**dev("piqa", 1), "answer": "solution3"}
    with pytest.raises(DataError, match=r"piqa record 1: answer 'solution3'"):
        zs.evaluate_zeroshot(model, tok, {"boolq": [dev("boolq", 0)],
                                          "piqa": [dev("piqa", 0), bad]}, progress=False)


def test_moka_eval_zeroshot_mode(model, tok, capsys):
    import eval as eval_cli

    args = eval_cli.parse_args(["--mode", "zeroshot", "--tasks", "piqa", "winogrande"])
    assert args.mode == "zeroshot" and args.template is None
    tasks = {"piqa": [dev("piqa", 0)], "winogrande": [dev("winogrande", 0)]}
    report = eval_cli.run(args, model, None, tok, tasks)
    assert report["mode"] == "zeroshot" and set(report["tasks"]) == {"piqa", "winogrande"}
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["task", "n", "acc", "%", "acc_norm", "%"]
    assert f"{100 * report['average']['acc_norm']:.2f}" in out.splitlines()[-2]
    with pytest.raises(SystemExit) as e:
        eval_cli.parse_args(["--mode", "zeroshot", "--template", "alpaca"])
    assert e.value.code == 2 and "--template does not apply" in capsys.readouterr().err


def test_moka_eval_zeroshot_rejects_a_malformed_record_before_loading_the_model(
        tmp_path, capsys, monkeypatch):
    import eval as eval_cli
    import moka_jax.api as api

    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("model loaded"))
    good, bad = dev("piqa", 0), {**dev("piqa", 1), "instruction": "Which is right?"}
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "dev.json").write_text(json.dumps([good, bad]))
    assert eval_cli.main(["--mode", "zeroshot", "--tasks", "piqa",
                          "--data-dir", str(tmp_path)]) == 2
    assert "error: piqa record 1: the piqa opening" in capsys.readouterr().err


def _lm_eval_doc(doc, record):
    """The record back in the task's Hugging Face schema (what lm-eval's YAML reads)."""
    f, o, g = doc.fields, list(doc.options), doc.gold
    letters = {"choices": {"text": o, "label": list("ABCDE"[:len(o)])}, "answerKey": "ABCDE"[g]}
    if doc.task == "boolq":
        return {**f, "label": g}
    if doc.task == "piqa":
        return {**f, "label": g}
    if doc.task == "social_i_qa":  # any split at a space renders the same "{context} {question}"
        context, question = f["question"].rsplit(" ", 1)
        return {"context": context, "question": question, "answerA": o[0], "answerB": o[1],
                "answerC": o[2], "label": str(g + 1)}
    if doc.task == "hellaswag":  # ctx_b: the lower-case tail of ActivityNet contexts
        ctx, ctx_b = f["ctx"], ""
        tail = ctx.rsplit(". ", 1)
        if not ctx.startswith("How to ") and len(tail) == 2 and tail[1][:1].islower():
            ctx, ctx_b = tail[0] + ".", tail[1]
        return {"activity_label": f["activity_label"], "ctx_a": ctx, "ctx_b": ctx_b,
                "endings": o, "label": str(g)}
    if doc.task == "winogrande":
        return {**f, "answer": record["answer"][-1]}
    return {**f, **letters}


LM_EVAL_YAMLS = {"boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml",
                 "social_i_qa": "siqa/siqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                 "winogrande": "winogrande/default.yaml", "ARC-Easy": "arc/arc_easy.yaml",
                 "ARC-Challenge": "arc/arc_challenge.yaml",
                 "openbookqa": "openbookqa/openbookqa.yaml"}


def test_lm_eval_itself_gives_the_same_scores_and_accuracies(tmp_path, monkeypatch):
    """The installed lm-eval's own task configs (included, only the data made local, acc_norm
    asked of every task), run on moka_jax's harness model, over the parsed dev records: the same
    log-likelihoods, acc and acc_norm as evaluate_zeroshot."""
    pytest.importorskip("lm_eval")
    harness = pytest.importorskip("moka_jax.harness")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(pytest.importorskip("lm_eval").__file__).parent / "tasks"
    n = 2
    records = {t: json.loads((DATA / t / "dev.json").read_text())[:n] for t in LM_EVAL_YAMLS}
    records["hellaswag"] = [dev("hellaswag", i) for i in (0, 3)]  # WikiHow + ActivityNet
    for t, recs in records.items():
        docs = [_lm_eval_doc(zs.parse_record(t, r, i), r) for i, r in enumerate(recs)]
        (tmp_path / f"{t}.json").write_text(json.dumps(docs))
        # boolq: the records have no passage; ours drops the empty "{passage}\n".
        text = '\ndoc_to_text: "Question: {{question}}?\\nAnswer:"' if t == "boolq" else ""
        (tmp_path / f"zs_{t}.yaml").write_text(
            f"include: {root / LM_EVAL_YAMLS[t]}\ntask: zs_{t}\ndataset_path: json\n"
            f"dataset_name: null\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / t}.json\n"
            f"  cache_dir: {tmp_path / 'cache'}\ntraining_split: null\nvalidation_split: null\n"
            f"test_split: test\nfewshot_split: null\ntag: []\nmetric_list:\n  - metric: acc\n"
            f"  - metric: acc_norm{text}\n")
    # An instance, not model_args: lm-eval's argument parsing turns quant=none into None (nf4).
    lm = harness.MokaLM(base="random", quant="none", dtype="float32", greedy_check=False,
                        batch_size=4)
    out = simple_evaluate(model=lm, tasks=[f"zs_{t}" for t in records], batch_size=4,
                          log_samples=True, task_manager=TaskManager(include_path=str(tmp_path),
                                                   include_defaults=False))
    ours = zs.evaluate_zeroshot(lm.model, lm.tokenizer, records, batch_size=4, progress=False)
    for t in records:
        theirs = out["results"][f"zs_{t}"]
        mine = ours["tasks"][t]
        assert (theirs["acc,none"], theirs["acc_norm,none"]) == (mine["acc"], mine["acc_norm"]), t
        samples = sorted(out["samples"][f"zs_{t}"], key=lambda s: s["doc_id"])
        for s, item in zip(samples, mine["items"], strict=True):
            np.testing.assert_allclose([r[0] for r in s["filtered_resps"]], item["scores"],
                                       rtol=1e-5, err_msg=t)
