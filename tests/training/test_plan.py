"""Validation first: every bad input of a run is refused by train.py with exit status 2 and a
message naming it, before any weight is loaded (the loaders are booby-trapped here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import train as train_cli
from moka_jax.support import outputs
from moka_jax.config import load_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny-debug.yaml")
OBQA = REPO / "data/commonsense_train/openbookqa/train.json"


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything loads or builds model weights."""
    from moka_jax.models import hf
    from moka_jax.training import loop

    def trap(*a, **k):
        raise AssertionError("weights were loaded before validation finished")
    monkeypatch.setattr(loop, "load", trap)
    monkeypatch.setattr(hf, "load_hf", trap)


def base_sets(tmp_path) -> list[str]:
    return [f"train.out_dir={tmp_path / 'run'}", "data.train.0.limit=16", "data.train.1.limit=8",
            "data.val_size=0"]


def run_train(capsys, tmp_path, *sets) -> tuple[int, str]:
    argv = ["--config", TINY]
    for s in (*base_sets(tmp_path), *sets):
        argv += ["--set", s]
    rc = train_cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF directory (vocab 259, for the byte tokenizer), without tokenizer files."""
    from moka_jax.models.hf import save_hf
    from moka_jax.models.llama import Llama
    from moka_jax.training.plan import tiny_llama_config
    lc = tiny_llama_config(load_config(TINY))
    return save_hf(Llama(lc, quant="none", rngs=nnx.Rngs(0)), lc,
                   tmp_path_factory.mktemp("m") / "hf")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    recs = json.loads(OBQA.read_text())[:24]
    (d / "empty_output.json").write_text(json.dumps([{**r, "output": ""} for r in recs]))
    (d / "no_answer_field.jsonl").write_text("\n".join(
        json.dumps({k: v for k, v in r.items() if k != "output"}) for r in recs))
    (d / "random.json").write_bytes(np.random.default_rng(0).bytes(2000))
    return d


CASES = {
    # name: (overrides, expected message)
    "beta out of [0, 1)": (["train.b2=1.5"], "train.b2 = 1.5, expected in [0, 1)"),
    "negative scale": (["adapter.scale=-2"], "adapter.scale = -2.0, expected > 0"),
    "mesh larger than the devices": (["mesh.data=3"], "3 devices, but 1 are available"),
    "targets match nothing": (["adapter.targets=nomatch_proj$"], "matches no Linear layer"),
    "non-prime MoKAs block": (["adapter.kind=mokas", "adapter.primes=[4,7]"],
                              "block size 4 is not prime"),
    "LoRA rank above the layer dims": (["adapter.kind=lora", "adapter.r=100"],
                                       "r=100 exceeds min(out, in) = 64"),
    "MoKA shapes too small": (["adapter.shapes=[[[2,2],[2,2]]]"], "covers 4x4 but the weight is"),
    "MoKA budget too small": (["adapter.budget=10"], "budget 10 is too small"),
    "MoKA shapes out of proportion": (["adapter.shapes=[[[512,512],[512,512]]]"],
                                      "pads the 64x64 weight (out x in) to 262144x262144"),
    "embedding far larger than the tokenizer": (["model.tiny.vocab=49152"],
                                                "but the tokenizer (bytes) has only 259 tokens"),
    "cutoff past the model's positions": (["model.tiny.max_position=256"],
                                          "data.cutoff_len: 512 positions exceed the model's "
                                          "max_position_embeddings = 256; lower data.cutoff_len"),
    "tiny dims on a non-random base": (["model.path=smollm2", "model.tiny.hidden=32"],
                                       "model.tiny (hidden) shapes the random model only"),
    "cutoff below the prompts": (["data.cutoff_len=64", "data.buckets=[64]"],
                                 "a prompt that fills data.cutoff_len = 64; raise data.cutoff_len"),
    "out_dir holds the data": (["train.out_dir=" + str(REPO / "data/commonsense_train")],
                               "directory holding an input of this command"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_run_inputs_exit_2_before_weights(name, no_weights, capsys, tmp_path):
    overrides, message = CASES[name]
    rc, err = run_train(capsys, tmp_path, *overrides)
    assert rc == 2 and message in err, err


@pytest.mark.parametrize("file, message", [
    ("empty_output.json", "empty response and data.add_eos = false"),
    ("no_answer_field.jsonl", "missing field 'output'"),
    ("random.json", "data file is not UTF-8 text"),
])
def test_bad_data_files(file, message, data_files, no_weights, capsys, tmp_path):
    rc, err = run_train(capsys, tmp_path, f"data.train=[{data_files / file}]", "data.add_eos=false")
    assert rc == 2 and message in err and str(data_files / file) in err, err
    if file == "empty_output.json":
        assert "set data.add_eos = true" in err and "raise cutoff_len" not in err


@pytest.mark.parametrize("damage, message", [
    ("none", None),
    ("no tokenizer", "no tokenizer files"),
    ("truncated weights", "model.safetensors: tensor"),
    ("random weights", "header length field says"),
    ("converted dir", "a `moka-convert` directory"),
])
def test_model_directory(hf_dir, damage, message, no_weights, capsys, tmp_path):
    import shutil
    d = shutil.copytree(hf_dir, tmp_path / "m")
    tok = "model.tokenizer=null" if damage == "no tokenizer" else "model.tokenizer=bytes"
    st = d / "model.safetensors"
    if damage == "truncated weights":
        os.truncate(st, st.stat().st_size // 2)
    if damage == "random weights":
        st.write_bytes(np.random.default_rng(0).bytes(st.stat().st_size))
    if damage == "converted dir":
        (d / "moka_convert.json").write_text(json.dumps({"source": "/models/llama"}))
    if message is None:  # the same directory, undamaged, validates (and then loads weights)
        with pytest.raises(AssertionError, match="weights were loaded"):
            run_train(capsys, tmp_path, f"model.path={d}", tok)
        return
    rc, err = run_train(capsys, tmp_path, f"model.path={d}", tok)
    assert rc == 2 and message in err and str(d) in err, err


def fake_run(tmp_path, *sets):
    """A run directory as a finished run leaves it (marker, metrics, adapter), no training."""
    from moka_jax.training.plan import fingerprint
    cfg = load_config(TINY, [*base_sets(tmp_path), *sets])
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter.safetensors").write_bytes(b"trained")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    outputs.write_marker(run, "train", owner=fingerprint(cfg))
    return run


def test_existing_run_is_never_lost(no_weights, capsys, tmp_path):
    run = fake_run(tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    # Another config, with or without checkpoints: refused, the differences listed.
    rc, err = run_train(capsys, tmp_path, "adapter.r=2")
    assert rc == 2 and "another config. Set train.overwrite=true" in err, err
    assert err.strip().endswith("Differences:\n  adapter.r: there 4 vs now 2"), err
    # The same config with resume=false: refused, both ways forward named.
    rc, err = run_train(capsys, tmp_path, "train.resume=false")
    assert rc == 2 and "train.resume=true to continue it" in err and "train.overwrite=true" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # overwrite asked: the old run's files go (only those), then weights load.
    (run / "notes.txt").write_text("mine")
    with pytest.raises(AssertionError, match="weights were loaded"):
        run_train(capsys, tmp_path, "adapter.r=2", "train.overwrite=true")
    left = {p.name: p for p in run.iterdir()}
    assert set(left) == {outputs.MARKER, "notes.txt", "checkpoints"}  # the new run's, empty
    assert not any(left["checkpoints"].iterdir()) and left["notes.txt"].read_text() == "mine"


def test_no_intact_checkpoint_is_refused_before_weights(no_weights, capsys, tmp_path):
    import jax.numpy as jnp
    import optax
    from moka_jax.training.checkpoint import TrainCheckpointer
    from moka_jax.training.plan import fingerprint
    run = fake_run(tmp_path)
    ck = TrainCheckpointer(run, fingerprint(load_config(TINY, base_sets(tmp_path))))
    p = {"a": jnp.ones(3)}
    ck.save(2, p, optax.adam(1e-3).init(p), {"epoch": 0, "position": 2, "seed": 42})
    ck.close()
    os.remove(run / "checkpoints" / "2" / "state" / "manifest.ocdbt")
    rc, err = run_train(capsys, tmp_path)
    assert rc == 2 and "no intact checkpoint" in err and "step 2: state/manifest.ocdbt: missing" in err


def test_run_reports_loaded_and_dropped_examples(capsys, tmp_path):
    from moka_jax.training.plan import plan_run
    cfg = load_config(TINY, [f"train.out_dir={tmp_path / 'run'}", "data.cutoff_len=400",
                             "data.buckets=[400]"])
    plan = plan_run(cfg, 1)
    out = capsys.readouterr().out
    report = {Path(r["file"]).parent.name: r for r in plan.data_report}
    dropped = sum(sum(r["dropped"].values()) for r in report.values())
    assert dropped > 0 and report["boolq"]["records"] == 256 and report["openbookqa"]["records"] == 128
    assert f"data: 384 examples loaded from 2 file(s)" in out
    assert f"dropped {dropped}: {dropped} with a prompt that fills data.cutoff_len = 400" in out
    assert f"training on {len(plan.train_data)}, validating on 16, 16 of them held out" in out
    assert len(plan.train_data) + 16 + dropped == 384
    assert plan.targets == [f"layers/{i}/attn/{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_exit_status_2_from_the_real_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "train.py", "--config", TINY, "--set", "mesh.data=3",
                           "--set", f"train.out_dir={tmp_path / 'r'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: mesh: data (3) x fsdp (1)")
    assert "Traceback" not in proc.stderr
