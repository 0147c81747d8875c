"""Adapter op speed and bf16 error: factored MoKA (both schedules) vs materialised dW vs MoKAs /
LoRA / dense base; nf4 matmul.

Speed: f32 and bf16 (adapter parameters f32, activations and compute in the dtype), 2048
tokens, forward + backward (grads wrt the input and the adapter parameters; the base is frozen,
so the dense path's backward is the activation gradient only). Every path returns its loss too
(value_and_grad): with a plain grad of this linear loss XLA drops the forward matmul, so the
dense path ran half the flops it was credited with. Each path is jitted, warmed up, then timed
`--repeats` times; the median is reported. "moka_factored" is the schedule the policy picks on
this backend (kron.resolve_schedule); moka_chunked / moka_batched are both schedules.

bf16 error (not timing): each path's bf16 delta dW x and x-gradient on one 576x576 layer (MoKA
with the planner's r=10), against float64 from the same f32 parameters; "rel" is
||y - ref|| / ||ref|| (Frobenius: stable across seeds), "max_rel" is max|y - ref| / max|ref|
(jumps with the binade of the largest output). "over_dense" divides by the error of the dense
bf16 matmul by the same dW (f32 accumulation). Last stdout line: one JSON.

    python bench/adapter_ops.py [--tokens 2048] [--repeats 7] [--dtypes float32,bfloat16]
    python bench/adapter_ops.py --quick       # a 64->96 layer, 32 tokens, 1 repeat (tests)
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from timing import median_seconds  # bench/timing.py (run as a script from bench/)

from moka_jax import nn, quant
from moka_jax.adapters import LoRAConfig, MoKAConfig, MoKAsConfig
from moka_jax.core import kron, shapes
from moka_jax.support import machine

jax.config.update("jax_default_matmul_precision", "highest")  # f32 as f32; bf16 is unaffected

LAYERS = {"4096x4096": (4096, 4096), "4096->1024": (1024, 4096)}  # (m, n) = (out, in)
QUICK_LAYERS = {"64->96": (96, 64)}  # --quick: runs every timed path, times nothing useful
MOKA_R = 10
PAPER_BUDGET = 81920  # ~80k per layer, the paper's MoKA budget on LLaMA-2-7B q/v
MOKAS_R = 4
ERROR_LAYER, ERROR_TOKENS = (576, 576), 256  # SmolLM2's q_proj; the planner's r=10: 9 output groups


def timeit(fn, args, repeats: int) -> float:
    return median_seconds(fn, args, repeats, warmups=2)


def fwd_bwd(apply):
    """jit(value_and_grad of <apply(params, x), cot>) wrt (params, x)."""
    def loss(params, x, cot):
        return jnp.vdot(apply(params, x), cot)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def randomised(adapter, seed=0):
    """Small random values in every leaf (B = 0 at init) so the timed math is the real math."""
    graphdef, state = nnx.split(adapter)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [0.02 * jax.random.normal(k, v.shape, v.dtype) for k, v in zip(keys, leaves)]
    return graphdef, jax.tree.unflatten(tree, leaves)


def moka_fwd_flops(adapter, tokens: int) -> int:
    per_token = sum(min(kron.kron_flops(a, b)) for a, b in adapter.shapes)
    return tokens * per_token


def bench_layer(m: int, n: int, tokens: int, repeats: int, rng, dtype=jnp.float32,
                budget: int | None = PAPER_BUDGET) -> dict:
    base = nn.Linear(n, m, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((tokens, n)), dtype)
    cot = jnp.asarray(rng.standard_normal((tokens, m)), dtype)
    w = base.weight(dtype)
    dense_flops = 4 * tokens * m * n  # forward + activation gradient
    out = {}

    def record(name, fn, args, flops, params=None):
        t = timeit(fn, args, repeats)
        out[name] = {"seconds": t, "gflop": flops / 1e9, "gflops_per_s": flops / t / 1e9}
        if params is not None:
            out[name]["params"] = params

    dense = jax.jit(jax.value_and_grad(lambda x, w, cot: jnp.vdot(x @ w.T, cot)))
    record("dense_base", dense, (x, w, cot), dense_flops)

    moka = MoKAConfig(r=MOKA_R, budget=budget).build(base, "moka", nnx.Rngs(1))
    gd, st = randomised(moka)
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(st))
    fwd = moka_fwd_flops(moka, tokens)
    for schedule in ("chunked", "batched"):
        gd_s = nnx.graphdef(with_schedule(nnx.merge(gd, st), schedule))
        record(f"moka_{schedule}", fwd_bwd(lambda p, x, g=gd_s: nnx.merge(g, p).delta(x)),
               (st, x, cot), 3 * fwd, params)
    picked = kron.resolve_schedule()
    out["moka_factored"] = {**out[f"moka_{picked}"], "schedule": picked}
    out["moka_factored"]["shapes"] = [list(map(list, s)) for s in moka.shapes]
    # Groups of equal shapes are one stacked contraction; equal input / output splits share a
    # matmul (kron.kron_mixture_apply), so these counts drive the factored path's speed.
    out["moka_factored"]["groups"] = len(set(moka.shapes))
    out["moka_factored"]["input_splits"] = len({(na, nb) for (_, na), (_, nb) in moka.shapes})
    out["moka_factored"]["output_splits"] = len({(ma, mb) for (ma, _), (mb, _) in moka.shapes})
    # PEFT LoKr's way: build dW = sum_i alpha_i kron(A_i, B_i), then a dense matmul.
    mat_flops = 6 * tokens * m * n + 3 * MOKA_R * m * n
    record("moka_materialized",
           fwd_bwd(lambda p, x: x @ nnx.merge(gd, p).delta_weight().T), (st, x, cot),
           mat_flops, params)

    mokas = MoKAsConfig(r=MOKAS_R).build(base, "mokas", nnx.Rngs(2))
    gd_s, st_s = randomised(mokas)
    fwd_s = sum(2 * tokens * shapes.mokas_params(m, n, p) * -(-n // p) for p in mokas.primes)
    record("mokas_factored", fwd_bwd(lambda p, x: nnx.merge(gd_s, p).delta(x)), (st_s, x, cot),
           3 * fwd_s, sum(int(np.prod(v.shape)) for v in jax.tree.leaves(st_s)))
    out["mokas_factored"]["primes"] = list(mokas.primes)

    lora = LoRAConfig(r=16).build(base, "lora", nnx.Rngs(3))
    gd_l, st_l = randomised(lora)
    record("lora_r16", fwd_bwd(lambda p, x: nnx.merge(gd_l, p).delta(x)), (st_l, x, cot),
           3 * 2 * tokens * 16 * (m + n), 16 * (m + n))

    out["moka_speedup_vs_materialized"] = (out["moka_materialized"]["seconds"]
                                           / out["moka_factored"]["seconds"])
    out["moka_gflops_over_dense_gflops"] = (out["moka_factored"]["gflops_per_s"]
                                            / out["dense_base"]["gflops_per_s"])
    out["moka_time_over_dense_time"] = (out["moka_factored"]["seconds"]
                                        / out["dense_base"]["seconds"])
    return out


def with_schedule(moka, schedule: str):
    moka.schedule = schedule
    return moka


# ---- bf16 error of each path (not timing) ---------------------------------------------------

def _errors(y, ref) -> dict:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    return {"rel": float(np.linalg.norm(y - ref) / np.linalg.norm(ref)),
            "max_rel": float(np.abs(y - ref).max() / np.abs(ref).max())}


@functools.partial(jax.jit, static_argnums=0)
def _value_and_dx(graphdef, params, x, cot):
    """(delta(x), its x-gradient for cotangent cot); graphdef holds the schedule."""
    y, vjp = jax.vjp(lambda x: nnx.merge(graphdef, params).delta(x), x)
    return y, vjp(cot)[0]


def bf16_errors(rng, m: int = ERROR_LAYER[0], n: int = ERROR_LAYER[1],
                tokens: int = ERROR_TOKENS) -> dict:
    """Per path: the bf16 delta's and x-gradient's errors against float64, and over dense."""
    base = nn.Linear(n, m, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((tokens, n)), jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((tokens, m)), jnp.bfloat16)
    x64, cot64 = np.asarray(x, np.float64), np.asarray(cot, np.float64)
    adapters = {"moka": MoKAConfig(r=MOKA_R), "mokas": MoKAsConfig(r=MOKAS_R),
                "lora_r16": LoRAConfig(r=16)}
    out = {}
    for name, config in adapters.items():
        graphdef, params = randomised(config.build(base, name, nnx.Rngs(1)))
        adapter = nnx.merge(graphdef, params)
        with jax.default_matmul_precision("highest"):
            dw = np.asarray(adapter.delta_weight(), np.float64)  # f32-exact materialised dW
        y_ref, dx_ref = x64 @ dw.T, cot64 @ dw
        dense = lambda v, w: jnp.matmul(v, jnp.asarray(w, jnp.bfloat16),
                                        preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        paths = {"dense": (dense(x, dw.T), dense(cot, dw))}
        schedules = ("chunked", "batched") if name == "moka" else (None,)
        for schedule in schedules:
            gd = graphdef if schedule is None else nnx.graphdef(with_schedule(adapter, schedule))
            paths[f"{name}_{schedule}" if schedule else name] = _value_and_dx(gd, params, x, cot)
        res = {}
        for path, (y, dx) in paths.items():
            res[path] = {"error": _errors(y, y_ref), "dx_error": _errors(dx, dx_ref)}
        for path, r in res.items():
            for kind in ("error", "dx_error"):
                r[kind]["over_dense"] = r[kind]["rel"] / res["dense"][kind]["rel"]
                r[kind]["max_over_dense"] = r[kind]["max_rel"] / res["dense"][kind]["max_rel"]
        out[name] = res
    out["moka"]["moka_factored"] = out["moka"][f"moka_{kron.resolve_schedule()}"]
    return out


def bench_nf4(tokens: int, repeats: int, rng, m=4096, n=4096) -> dict:
    w = rng.standard_normal((m, n)).astype(np.float32) * 0.02
    q = quant.quantize(w, "nf4")
    x = jnp.asarray(rng.standard_normal((tokens, n)), jnp.float32)
    w_t = jnp.asarray(w.T)
    t_dense = timeit(jax.jit(lambda x, w_t: x @ w_t), (x, w_t), repeats)
    t_nf4 = timeit(jax.jit(lambda x, q: quant.quant_matmul(x, q)), (x, q), repeats)
    return {"shape": [tokens, n, m], "dense_seconds": t_dense, "nf4_seconds": t_nf4,
            "nf4_bytes": q.nbytes, "dense_bytes": w.nbytes,
            "nf4_matmul_over_dense": t_nf4 / t_dense}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of timed dtypes")
    ap.add_argument("--quick", action="store_true",
                    help="a 64->96 layer, 32 tokens, 1 repeat: runs every path, times nothing useful; "
                         "the bf16 errors are the full ones")
    args = ap.parse_args()
    args.tokens = args.tokens or (32 if args.quick else 2048)
    args.repeats = args.repeats or (1 if args.quick else 7)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if bad := sorted(set(dtypes) - {"float32", "bfloat16"}):
        ap.error(f"--dtypes: unknown {bad}; choose from float32, bfloat16")
    if min(args.tokens, args.repeats) < 1:
        ap.error("--tokens and --repeats must be >= 1")
    rng = np.random.default_rng(0)
    result = {"bench": "adapter_ops", "backend": jax.default_backend(),
              "cpu_count": os.cpu_count(), "machine": machine.cpu_info()["cpu_model"],
              "machine_details": machine.describe(),
              "tokens": args.tokens, "dtypes": dtypes, "quick": args.quick,
              "schedule": kron.resolve_schedule(), "layers": {}}
    layers = QUICK_LAYERS if args.quick else LAYERS
    for name, (m, n) in tqdm(layers.items(), desc="layers"):
        runs = {d: bench_layer(m, n, args.tokens, args.repeats, rng, jnp.dtype(d),
                               None if args.quick else PAPER_BUDGET) for d in dtypes}
        result["layers"][name] = {**runs.pop("float32", {}), **runs}  # f32 where it always was
    nf4_shape = (96, 64) if args.quick else (4096, 4096)
    result["nf4"] = bench_nf4(args.tokens, args.repeats, rng, *nf4_shape)
    rows = {"": [v for v in result["layers"].values() if "dense_base" in v],
            "_bf16": [v["bfloat16"] for v in result["layers"].values() if "bfloat16" in v]}
    for suffix, picked in rows.items():
        for key in ("moka_speedup_vs_materialized", "moka_gflops_over_dense_gflops"):
            if picked:
                result[key + suffix] = min(v[key] for v in picked)
    result["nf4_matmul_over_dense"] = result["nf4"]["nf4_matmul_over_dense"]
    result["bf16_errors"] = bf16_errors(np.random.default_rng(1))
    moka = result["bf16_errors"]["moka"]["moka_factored"]
    result["moka_bf16_error_over_dense_bf16_error"] = moka["error"]["over_dense"]
    result["moka_bf16_max_error_over_dense_bf16_max_error"] = moka["error"]["max_over_dense"]
    result["targets"] = {"moka_speedup_vs_materialized": ">= 3",
                         "moka_gflops_over_dense_gflops": ">= 0.5", "nf4_matmul_over_dense": "<= 1.3",
                         "moka_bf16_error_over_dense_bf16_error": "<= 1.5"}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
