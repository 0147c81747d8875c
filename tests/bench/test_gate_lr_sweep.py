"""bench/gate_lr_sweep.py in its tiny mode: one run per multiplier, entropy trajectories."""

import importlib.util
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("gate_lr_sweep", REPO / "bench" / "gate_lr_sweep.py")
gate_lr_sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate_lr_sweep)


def test_tiny_sweep_records_entropy_and_val_loss(tmp_path, capsys):
    gate_lr_sweep.main(["--tiny", "--mults", "1", "300", "--steps", "4", "--eval-every", "2",
                        "--lr", "1e-2", "--set", "model.tiny.layers=1",
                        "--set", "model.quant=none", "--out", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["bench"] == "gate_lr_sweep" and out["model"] == "tiny"
    runs = out["runs"]
    assert set(runs) == {"1", "300"}
    for k, r in runs.items():
        assert [s for s, _ in r["gate_entropy"]] == [1, 2, 3, 4]  # every log step
        assert [s for s, _ in r["val_loss"]] == [2, 4] and r["final_val_loss"] == r["val_loss"][-1][1]
        gates = json.loads((tmp_path / f"mult-{k}" / "gates.json").read_text())
        want = np.mean([-(np.asarray(a) * np.log(a)).sum() / np.log(len(a))
                        for a in gates.values()])
        assert abs(r["gate_entropy"][-1][1] - want) < 1e-5
        assert r["alpha_min"] == min(a for v in gates.values() for a in v)
    # A larger gate lr moves the gates further from uniform, from the same start.
    assert abs(runs["1"]["gate_entropy"][0][1] - 1.0) < 1e-9  # lr 0 at step 1 (warm-up)
    assert runs["300"]["gate_entropy"][0][1] == runs["1"]["gate_entropy"][0][1]
    assert runs["300"]["gate_entropy"][-1][1] < runs["1"]["gate_entropy"][-1][1]
    assert out["best_by_val_loss"] == float(min(runs, key=lambda k: runs[k]["final_val_loss"]))
