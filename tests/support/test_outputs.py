"""Never lose data: the one safe-output check, and every CLI writer going through it."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moka_jax.support import outputs

REPO = Path(__file__).resolve().parents[2]


def test_rules(tmp_path):
    out = tmp_path / "out"
    assert outputs.check_output(out, command="a") == "new"
    out.mkdir()
    assert outputs.check_output(out, command="a") == "new"  # empty
    outputs.write_marker(out, "a", owner={"x": 1})
    assert outputs.check_output(out, command="a") == "new"  # only a marker
    (out / "f").write_text("1")
    with pytest.raises(outputs.OutputError, match="earlier output of `a`.*--overwrite"):
        outputs.check_output(out, command="a")
    with pytest.raises(outputs.OutputError, match="holds the output of `a`"):
        outputs.check_output(out, command="b")
    assert outputs.check_output(out, command="a", overwrite=True) == "replace"
    assert outputs.check_output(out, command="a", owner={"x": 1}, reuse=True) == "same"
    with pytest.raises(outputs.OutputError, match=r"(?s)another config.*x: there 1 vs now 2"):
        outputs.check_output(out, command="a", owner={"x": 2}, reuse=True)
    # Not ours: refused even with overwrite; never an input, whatever the flags.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(outputs.OutputError, match=r"did not write \(notes.txt\).*not even"):
        outputs.check_output(mine, command="a", overwrite=True)
    with pytest.raises(outputs.OutputError, match="is an input of this command"):
        outputs.check_output(mine, command="a", inputs=[mine], overwrite=True)
    with pytest.raises(outputs.OutputError, match="a directory holding an input"):
        outputs.check_output(tmp_path, command="a", inputs=[mine / "notes.txt"], overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep"


# Overwrite replaces only an output of the same command and kind. (what the directory holds:
# marker command or None for no marker, its files; the writer's command; a regex of the
# refusal, or "replace")
OVERWRITE = [
    ("train", ["metrics.jsonl", "checkpoints/10/x"], "export-hf", r"output of `train` "
     r"\(checkpoints, metrics.jsonl\); export-hf never replaces another command's output"),
    ("export-hf", ["model.safetensors"], "export-peft", r"output of `export-hf`"),
    ("export-peft", ["adapter_model.safetensors"], "train", r"output of `export-peft`"),
    ("convert", ["state/x"], "export-requantize", r"output of `convert`"),
    ("save_adapter", ["adapter.safetensors"], "export-orbax", r"output of `save_adapter`"),
    (None, ["notes.txt"], "export-hf", r"did not write \(notes.txt\)"),
    ("export-hf", ["model.safetensors"], "export-hf", "replace"),
    ("train", ["metrics.jsonl"], "train", "replace"),
]


@pytest.mark.parametrize("marker,held,command,want", OVERWRITE)
def test_overwrite_replaces_only_its_own_kind(tmp_path, marker, held, command, want):
    for name in held:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("keep")
    if marker is not None:
        outputs.write_marker(tmp_path, marker)
    before = snapshot(tmp_path)
    if want == "replace":
        assert outputs.check_output(tmp_path, command=command, overwrite=True) == "replace"
    else:
        with pytest.raises(outputs.OutputError, match=want):
            outputs.check_output(tmp_path, command=command, overwrite=True)
    assert snapshot(tmp_path) == before


def test_export_overwrite_never_replaces_a_training_run(tmp_path, capsys):
    """moka-export --out RUN_DIR --overwrite: refused before the base loads; the run is kept."""
    from moka_jax.cli import export
    from moka_jax.io.adapter_format import write_adapter
    adapter = write_adapter(tmp_path / "adapter", {"x": np.ones(2, np.float32)},
                           adapter_config={"kind": "lora"}, targets="q_proj$", base={})
    run = tmp_path / "run"
    (run / "checkpoints" / "10").mkdir(parents=True)
    (run / "checkpoints" / "10" / "meta").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    outputs.write_marker(run, "train", owner={"name": "t"})
    before = snapshot(run)
    for fmt in ("hf", "peft", "orbax"):
        argv = ["--model", "random", "--adapter", str(adapter), "--out", str(run), "--format",
                fmt, "--overwrite"]
        assert export.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "holds the output of `train`" in err[0], err
    assert snapshot(run) == before


def test_file_rules(tmp_path):
    data = tmp_path / "dev.json"
    data.write_text("[]")
    for path in (data, tmp_path):
        with pytest.raises(outputs.OutputError, match="input"):
            outputs.check_output_file(path, command="eval", inputs=[data], overwrite=True)
    p = tmp_path / "report.json"
    outputs.check_output_file(p, command="eval", inputs=[data])
    outputs.write_file_atomic(p, "{}")
    with pytest.raises(outputs.OutputError, match="already exists; pass --overwrite"):
        outputs.check_output_file(p, command="eval")
    outputs.check_output_file(p, command="eval", overwrite=True)
    # A file of another command's output directory (a run's metrics) is never replaced.
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}")
    outputs.write_marker(run, "train")
    with pytest.raises(outputs.OutputError, match=r"part of the output of `train`.*not even"):
        outputs.check_output_file(run / "metrics.jsonl", command="eval", overwrite=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["dev.json", "report.json", "run"]



def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("dst", ["same", "parent"])
def test_convert_never_writes_over_its_source(hf_dir, dst, capsys):
    from moka_jax.cli import convert
    before = snapshot(hf_dir)
    target = hf_dir if dst == "same" else hf_dir.parent
    assert convert.main([str(hf_dir), str(target), "--overwrite", "--quant", "none"]) == 2
    assert "an input of this command" in capsys.readouterr().err
    assert snapshot(hf_dir) == before


def test_export_never_writes_over_its_adapter_or_base(hf_dir, tmp_path, capsys):
    from moka_jax.cli import export
    from moka_jax.io.adapter_format import write_adapter
    adapter = write_adapter(tmp_path / "adapter", {"x": np.ones(2, np.float32)},
                           adapter_config={"kind": "lora"}, targets="q_proj$", base={})
    before = snapshot(adapter), snapshot(hf_dir)
    for out in (adapter, tmp_path, hf_dir):
        argv = ["--model", str(hf_dir), "--adapter", str(adapter), "--out", str(out), "--overwrite"]
        assert export.main(argv) == 2
        assert "an input of this command" in capsys.readouterr().err
    assert (snapshot(adapter), snapshot(hf_dir)) == before


def test_eval_out_never_overwrites_a_data_file(tmp_path, capsys):
    import eval as eval_cli
    dev = tmp_path / "boolq" / "dev.json"
    dev.parent.mkdir()
    dev.write_text((REPO / "data/commonsense/boolq/dev.json").read_text())
    before = dev.read_bytes()
    argv = ["--data-dir", str(tmp_path), "--tasks", "boolq", "--out", str(dev), "--overwrite"]
    assert eval_cli.main(argv) == 2  # before the model is loaded
    assert "input of this command" in capsys.readouterr().err
    assert dev.read_bytes() == before
    other = tmp_path.parent / f"{tmp_path.name}_old_report.json"
    other.write_text("{}")
    assert eval_cli.main(["--data-dir", str(tmp_path), "--tasks", "boolq", "--out",
                          str(other)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_save_adapter_tied_to_its_run(tmp_path):
    from moka_jax.io.adapter_format import write_adapter
    kw = dict(adapter_config={"kind": "lora"}, targets="q_proj$", base={})
    p1 = {"x": np.ones(2, np.float32)}
    write_adapter(tmp_path / "a", p1, owner={"adapter": {"r": 4}}, **kw)
    write_adapter(tmp_path / "a", p1, owner={"adapter": {"r": 4}}, **kw)  # its own run: fine
    with pytest.raises(outputs.OutputError, match=r"(?s)another config.*adapter.r: there 4 vs now 2"):
        write_adapter(tmp_path / "a", p1, owner={"adapter": {"r": 2}}, **kw)
    with pytest.raises(outputs.OutputError, match="overwrite"):
        write_adapter(tmp_path / "a", p1, **kw)  # no owner: only with overwrite
    assert oct(os.stat(tmp_path / "a").st_mode & 0o777) != oct(0o700)  # not mkdtemp's 0700
    assert json.loads((tmp_path / "a" / outputs.MARKER).read_text())["owner"] == {"adapter": {"r": 4}}
