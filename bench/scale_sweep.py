"""The experiment behind MoKA's default `scale`: a teacher-student fit of one adapted layer.

SmolLM2 q_proj shape (576 x 576), frozen random base W0. The teacher is W0 + dW* where dW* is
a sum of r Kronecker products in the planner's shapes scaled to 1% of ||W0|| (fine-tuning
deltas are small). The student is MoKADense(r=4) at init (dW = 0), trained with the paper's
optimizer (AdamW, lr 2e-4, 300 steps, batch 256 random inputs) at each scale. With Adam,
`scale` multiplies the size of the effective dW step, so too small learns slowly and too
large overshoots. Reports the final relative error ||dW - dW*|| / ||dW*|| per scale (mean of
3 seeds) and the best. Last stdout line: one JSON object.

    python bench/scale_sweep.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moka_jax.core import shapes
from moka_jax.adapters import MoKAConfig
from moka_jax.nn import MoKADense
from moka_jax.variables import AdapterParam

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
M = N = 576
R = 4


def teacher_delta(seed: int, w0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dw = sum(np.kron(rng.standard_normal(a), rng.standard_normal(b))[:M, :N]
             for a, b in shapes.plan_moka_shapes(M, N, R))
    return (dw * 0.01 * np.linalg.norm(w0) / np.linalg.norm(dw)).astype(np.float32)


def fit(scale: float, seed: int, steps: int, lr: float) -> float:
    layer = MoKADense(N, M, moka=MoKAConfig(r=R, scale=scale), rngs=nnx.Rngs(seed))
    w0 = np.asarray(layer.weight())
    dw_true = jnp.asarray(teacher_delta(seed + 100, w0))
    tx = optax.adamw(lr)
    graphdef, params, frozen = nnx.split(layer, AdapterParam, ...)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, key):
        x = jax.random.normal(key, (256, N))

        def loss(p):
            m = nnx.merge(graphdef, p, frozen)
            return jnp.mean((m(x) - m.base(x) - x @ dw_true.T) ** 2)
        l, g = jax.value_and_grad(loss)(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, l

    key = jax.random.key(seed)
    for _ in range(steps):
        key, sub = jax.random.split(key)
        params, opt_state, _ = step(params, opt_state, sub)
    dw = nnx.merge(graphdef, params, frozen).adapter.delta_weight()
    return float(jnp.linalg.norm(dw - dw_true) / jnp.linalg.norm(dw_true))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()
    errors = {s: float(np.mean([fit(s, seed, args.steps, args.lr) for seed in range(3)]))
              for s in SCALES}
    for s, e in errors.items():
        print(f"scale {s:6.2f}: relative error {e:.4f}")
    best = min(errors, key=errors.get)
    print(json.dumps({"bench": "scale_sweep", "shape": [M, N], "r": R, "lr": args.lr,
                      "steps": args.steps, "relative_error": {str(k): v for k, v in errors.items()},
                      "best_scale": best}))


if __name__ == "__main__":
    main()
