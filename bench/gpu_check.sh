#!/usr/bin/env bash
# The one script for a lent GPU machine: environment, correctness checks on the GPU (both
# schedules of the Kronecker apply, MoKA's bf16 error, nf4, a train step), then
# bench/gpu_bench.py (LLaMA-2-7B shapes, nf4, MoKA with the batched and the chunked schedule vs
# LoRA r=16; the chunked variant runs last, so a timeout loses only it); under 8 minutes in all.
#
#   bash bench/gpu_check.sh [gpu_bench.py options]     # from the repo root
#   GPU_CHECK_TINY=1 bash bench/gpu_check.sh           # CPU smoke test: --tiny, no nvidia-smi
#
# Everything lands in $OUT (default ./gpu_out): env.txt, check.log, check.json, bench.log,
# gpu_bench.json (the bench's final JSON, only when it finished). Exit code 0 iff the checks
# passed and every variant ran. Time limits: checks 90 s, bench 360 s (GPU_CHECK_CHECK_TIMEOUT,
# GPU_CHECK_BENCH_TIMEOUT); a variant's JSON line is in bench.log as soon as it finishes.
#
# Nothing is installed: the package runs from the tree (PYTHONPATH) on the machine's own jax,
# flax and optax, whatever their versions (env.txt records them). Every module the bench
# imports (jax, flax, optax, numpy, ml_dtypes, tqdm, yaml and their deps) is on the H200
# image; should one be missing there, bring it as wheels: here,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl NAME==VERSION
# and name .whl in the call's carry: this script installs .whl/*.whl into /tmp/site.
set -uo pipefail

OUT=${OUT:-./gpu_out}
TINY=${GPU_CHECK_TINY:-0}
PY=${PYTHON:-python3}
CHECK_TIMEOUT=${GPU_CHECK_CHECK_TIMEOUT:-90}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-360}
mkdir -p "$OUT"
: > "$OUT/env.txt"
# Progress bars redraw at most every 10 s, so they do not crowd the logs.
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$SECONDS

if [ "$TINY" = 1 ]; then
    tiny=(--tiny)
    expect=()
else
    tiny=()
    expect=(--expect-backend gpu)
fi

if [ "$TINY" != 1 ] && ! "$PY" -c "import moka_jax.models, moka_jax.training.step, optax, tqdm" \
        2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels into /tmp/site" | tee -a "$OUT/env.txt"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tee -a "$OUT/env.txt"
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    echo "== $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    [ "$TINY" != 1 ] && nvidia-smi
    "$PY" - <<'PYEOF'
import sys
import flax, jax, numpy, optax
print("python", sys.version.split()[0], "| jax", jax.__version__, "| flax", flax.__version__,
      "| optax", optax.__version__, "| numpy", numpy.__version__)
print("backend", jax.default_backend(), "| devices", jax.devices())
import moka_jax.models, moka_jax.training.step  # noqa: E401,F401  fails here if a dep is missing
print("moka_jax imports: ok")
PYEOF
} 2>&1 | tee -a "$OUT/env.txt"
env_rc=${PIPESTATUS[0]}

echo "== correctness checks (limit ${CHECK_TIMEOUT}s)"
timeout -k 10 "$CHECK_TIMEOUT" "$PY" bench/gpu_bench.py --check "${tiny[@]}" "${expect[@]}" \
    2>&1 | tee "$OUT/check.log"
check_rc=${PIPESTATUS[0]}
tail -n 1 "$OUT/check.log" | grep -o '{"bench": "gpu_check".*' > "$OUT/check.json" \
    || rm -f "$OUT/check.json"

echo "== gpu_bench (limit ${BENCH_TIMEOUT}s)"
timeout -k 10 "$BENCH_TIMEOUT" "$PY" bench/gpu_bench.py "${tiny[@]}" "$@" 2>&1 \
    | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
tail -n 1 "$OUT/bench.log" | grep -o '{"bench": "gpu_bench".*' > "$OUT/gpu_bench.json" \
    || rm -f "$OUT/gpu_bench.json"
[ "$TINY" != 1 ] && nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv | tee -a "$OUT/env.txt"

echo "== env rc $env_rc, check rc $check_rc, bench rc $bench_rc (124: timed out);" \
     "$((SECONDS - start)) s; outputs in $OUT"
[ "$env_rc" = 0 ] && [ "$check_rc" = 0 ] && [ "$bench_rc" = 0 ]
