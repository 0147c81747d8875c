"""bench/adapter_ops.py in its quick mode: every path runs in both dtypes, and the bf16 error
figures (the full 576x576, planner r=10 ones) meet the issue's target."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_mode_reports_bf16_beside_f32_and_the_bf16_errors():
    r = subprocess.run([sys.executable, str(REPO / "bench/adapter_ops.py"), "--quick"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    paths = {"dense_base", "moka_chunked", "moka_batched", "moka_factored", "moka_materialized",
             "mokas_factored", "lora_r16"}
    (layer,) = res["layers"].values()
    assert paths <= set(layer) and paths <= set(layer["bfloat16"])
    assert layer["moka_factored"]["schedule"] == res["schedule"] == "chunked"  # CPU policy
    for v in (layer, layer["bfloat16"]):
        assert all(v[p]["seconds"] > 0 for p in paths)
    assert {"moka_speedup_vs_materialized", "moka_speedup_vs_materialized_bf16"} <= set(res)
    errors = res["bf16_errors"]
    assert set(errors) == {"moka", "mokas", "lora_r16"}
    moka = errors["moka"]
    assert {"dense", "moka_chunked", "moka_batched", "moka_factored"} == set(moka)
    assert moka["dense"]["error"]["over_dense"] == 1.0
    for path in ("moka_chunked", "moka_batched"):  # two bf16 factors: ~sqrt(2) x one bf16 weight
        assert 1.0 < moka[path]["error"]["over_dense"] <= 1.5
        assert 1e-3 < moka[path]["error"]["rel"] < 1e-2
    assert res["moka_bf16_error_over_dense_bf16_error"] == moka["moka_chunked"]["error"]["over_dense"]
    assert res["moka_bf16_error_over_dense_bf16_error"] <= 1.5
