"""moka-jax inside lm-evaluation-harness 0.4.13, offline: a local multiple-choice task over the
shipped commonsense dev sets gives the accuracies (and log-likelihoods) of our own choice-mode
evaluation on the same items; generate_until gives our generation's text."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moka_jax as mj
from moka_jax.config import REPO_ROOT
from moka_jax.eval import commonsense as cs
from moka_jax.nn import adapter_state

lm_eval = pytest.importorskip("lm_eval")
harness = pytest.importorskip("moka_jax.eval.lm_eval")

TASKS, N = ("boolq", "piqa"), 4


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A LoRA with random factors on the random tiny model (dW != 0), saved as ours."""
    model, _ = mj.load("random", quant="none", dtype=jnp.float32)
    mj.attach_adapters(model, mj.LoRAConfig(r=4), ["q_proj", "v_proj"], rngs=nnx.Rngs(0))
    rng = np.random.RandomState(0)
    nnx.update(model, jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.2, x.shape), x.dtype),
                                   adapter_state(model)))
    return mj.save_adapter(model, tmp_path_factory.mktemp("a") / "adapter")


def write_tasks(root, cache):
    (root / "utils.py").write_text(textwrap.dedent("""
        from moka_jax.eval.commonsense import ANSWER_PREFIX, candidates, prompt_for

        def text(doc):
            return prompt_for(doc) + ANSWER_PREFIX

        def boolq_choices(doc):
            return list(candidates("boolq", doc))

        def piqa_choices(doc):
            return list(candidates("piqa", doc))
    """))
    for task in TASKS:
        (root / f"{task}.yaml").write_text(textwrap.dedent(f"""
            task: moka_{task}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {REPO_ROOT / "data/commonsense" / task / "dev.json"}
              cache_dir: {cache}
            test_split: test
            output_type: multiple_choice
            doc_to_text: !function utils.text
            doc_to_choice: !function utils.{task}_choices
            doc_to_target: answer
            target_delimiter: " "
            metric_list:
              - metric: acc
        """))


def test_lm_eval_accuracies_equal_our_choice_mode(adapter_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(tmp_path, tmp_path / "cache")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="moka_jax",
                          model_args=f"base=random,adapter={adapter_dir},quant=none,"
                                     "dtype=float32,greedy_check=false",  # acc needs no is_greedy
                          tasks=[f"moka_{t}" for t in TASKS], limit=N, batch_size=4,
                          task_manager=TaskManager(include_path=str(tmp_path),
                                                   include_defaults=False),
                          log_samples=True)
    model, tok = mj.load("random", adapter=adapter_dir, quant="none", dtype=jnp.float32)
    for task in TASKS:
        records = cs.load_task(REPO_ROOT / "data/commonsense" / task / "dev.json", task, N)
        ours = cs.evaluate_choice(model, tok, task, records, batch_size=4, progress=False)
        theirs = out["results"][f"moka_{task}"]["acc,none"]
        assert theirs == ours["accuracy"], (task, theirs, ours["accuracy"])
        samples = sorted(out["samples"][f"moka_{task}"], key=lambda s: s["doc_id"])
        for s, p in zip(samples, ours["predictions"]):
            ll = [r[0] for r in s["filtered_resps"]]
            np.testing.assert_allclose(ll, list(p["scores"].values()), rtol=1e-5, atol=1e-5)
    assert 0.0 < sum(cs_acc for cs_acc in [out["results"][f"moka_{t}"]["acc,none"]
                                           for t in TASKS]) < len(TASKS)  # not degenerate


def test_generate_until_and_rolling_match_ours(adapter_dir):
    from lm_eval.api.instance import Instance

    lm = harness.MokaLM(base="random", adapter=str(adapter_dir), quant="none", dtype="float32",
                        batch_size=2)
    prompts = ["The capital of France is", "Two plus two"]
    reqs = [Instance("generate_until", {}, (p, {"until": [], "max_gen_toks": 4}), i)
            for i, p in enumerate(prompts)]
    got = lm.generate_until(reqs)
    want = cs.generate_texts(lm.model, lm.tokenizer, prompts, eos_token_ids=lm.eos,
                             batch_size=2, max_new_tokens=4)
    assert [g.strip() for g in got] == want
    cut = got[0][2:3]  # a stop string taken from the first text; both rows share the shapes
    stops = lm.generate_until([Instance("generate_until", {}, (p, {"until": [cut],
                                                                   "max_gen_toks": 4}), i)
                               for i, p in enumerate(prompts)])
    assert stops == [g.split(cut)[0] for g in got]
    # Rolling log-likelihood of a string = log-likelihood of it after the prefix token.
    text = "a short text"
    (rolling,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    (want_ll,) = cs.score_continuations(lm.model, [[lm.prefix]], [[ids]], pad_id=lm.pad)
    assert rolling == pytest.approx(float(want_ll[0]), abs=1e-5)
    # is_greedy, on token ids (random bytes need not survive a decode / encode round trip).
    from moka_jax.eval.generate import generate
    ctx = lm.tokenizer(prompts[0])["input_ids"]
    ids, mask = np.zeros((2, len(ctx)), np.int32), np.ones((2, len(ctx)), bool)
    ids[:] = ctx
    best = [int(t) for t in generate(lm.model, ids, mask, max_new_tokens=4,
                                     pad_token_id=lm.pad)[0]]
    other = best[:-1] + [(best[-1] + 1) % 256 + 3]
    (ll_best, g_best), (ll_other, g_other) = lm._score([(ctx, best), (ctx, other)])
    assert g_best and not g_other and ll_best > ll_other
