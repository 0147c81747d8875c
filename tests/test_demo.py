"""demo.py on the tiny random model: before = the plain base, after = base + exported adapter."""

from pathlib import Path

import numpy as np
import pytest

import demo
from moka_jax.config import load_config
from moka_jax.data import load_tokenizer
from moka_jax.eval import evaluate_tasks, load_tasks
from moka_jax.io.attach import attach_exported_adapter
from moka_jax.api import load

REPO = Path(__file__).resolve().parents[1]
TASKS = ["boolq", "winogrande"]


def scores(results):
    return np.concatenate([[v for p in r["predictions"] for v in p["scores"].values()]
                           for r in results.values()])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    sets = ["train.steps=3", f"train.out_dir={out}/run", "train.eval_every=0", "data.val_size=0"]
    args = ["--config", str(REPO / "configs" / "tiny-debug.yaml"), "--limit", "3",
            "--tasks", *TASKS]
    for s in sets:
        args += ["--set", s]
    return demo.main(args), load_config(REPO / "configs" / "tiny-debug.yaml", sets)


def test_demo_before_is_the_base_and_after_is_the_exported_adapter(run):
    res, cfg = run
    assert res["steps_run"] == 3 and len(res["before"]) == len(TASKS)
    tasks = load_tasks(REPO / "data" / "commonsense", TASKS, limit=3)
    tok = load_tokenizer("bytes")
    base, _ = load(cfg.model)
    plain = evaluate_tasks(base, tok, tasks, progress=False)
    np.testing.assert_allclose(scores(res["before"]), scores(plain), rtol=1e-5, atol=1e-5)
    attach_exported_adapter(base, res["adapter_dir"])
    reloaded = evaluate_tasks(base, tok, tasks, progress=False)
    np.testing.assert_allclose(scores(res["after"]), scores(reloaded), rtol=1e-5, atol=1e-5)
    assert np.abs(scores(res["after"]) - scores(res["before"])).max() > 1e-4  # training moved it


def test_demo_writes_the_before_after_table(run):
    res, _ = run
    md = (Path(res["adapter_dir"]).parent / "demo_results.md").read_text()
    assert md.count("\n") == 2 + len(TASKS) + 1 and "| **average** | 6 |" in md


def test_before_after_table_counts_flips():
    pred = lambda *flags: {"predictions": [{"flag": f} for f in flags], "n": len(flags),
                           "accuracy": sum(flags) / len(flags)}
    table = demo.before_after_table({"boolq": pred(True, False, False)},
                                    {"boolq": pred(False, True, True)})
    assert "| boolq | 3 | 33.3 | 66.7 | +33.3 | 2 | 1 |" in table


def test_bad_limit_is_refused_before_any_work():
    with pytest.raises(SystemExit):
        demo.main(["--limit", "0"])
