"""Train-step speed on CPU: SmolLM2-135M shapes (random weights), nf4 base, batch 8 x 256.

Variants, each the real jitted TrainStep (loss, grads of the trainable tree, AdamW update):
  - frozen: no adapter; a zero (hidden,) probe added to the embeddings is the only trainable
    leaf, so the backward runs through every layer exactly as the adapters' does;
  - lora_r16: LoRA r=16 on q_proj, v_proj;
  - moka: MoKA r=4 on q_proj, v_proj, planner shapes, about a quarter of LoRA r=16's params.
The loss scores --labelled positions per row (16; the trainer's head runs on the labelled
positions only). Median of --steps timed steps after 2 warm-up steps. Last stdout line: one
JSON object.

    python bench/train_step.py [--steps 3] [--layers 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from moka_jax import nn
from moka_jax.adapters import LoRAConfig, MoKAConfig
from moka_jax.models import presets
from moka_jax.models.llama import Llama
from moka_jax.training.step import TrainStep, one_example_rows, split_model
from moka_jax.variables import AdapterParam

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procstat import peak_rss_bytes  # noqa: E402


class ProbedEmbed(nnx.Module):
    """Embeddings + a zero trainable probe: gives the frozen model a full-depth backward."""

    def __init__(self, embed, dim: int):
        self.inner = embed
        self.probe = AdapterParam(jnp.zeros((dim,), jnp.float32))

    def __call__(self, ids_BT, dtype):
        return self.inner(ids_BT, dtype) + self.probe[...].astype(dtype)

    def attend(self, x_BTD):
        return self.inner.attend(x_BTD)


def build(variant: str, layers: int, dtype=jnp.float32, config=None):
    model = Llama(config or presets.smollm2(layers), dtype=dtype, quant="nf4", rngs=nnx.Rngs(0))
    if variant == "frozen":
        model.embed = ProbedEmbed(model.embed, model.config.hidden_size)
    elif variant == "lora_r16":
        nn.attach_adapters(model, LoRAConfig(r=16, alpha=32), rngs=nnx.Rngs(1))
    elif variant == "moka":
        nn.attach_adapters(model, MoKAConfig(r=4), rngs=nnx.Rngs(1))
    return model


def time_variant(variant: str, layers: int, steps: int, batch: dict) -> dict:
    model = build(variant, layers)
    n_params = nn.count_params(model)
    graphdef, params, frozen = split_model(model)
    del model
    tx = optax.adamw(2e-4)
    opt_state = tx.init(params)
    step = TrainStep(graphdef, tx)
    times = []
    for i in tqdm(range(2 + steps), desc=variant, leave=False):
        t0 = time.perf_counter()
        params, opt_state, m = step(params, opt_state, frozen, batch)
        jax.block_until_ready(m["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    tokens = int(batch["input_ids"].size)
    return {"trainable_params": n_params, "step_seconds": t, "tokens_per_s": tokens / t,
            "compilations": step.compilations, "loss": float(m["loss"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--labelled", type=int, default=16, help="scored positions per row")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, (1, args.batch, args.seq), dtype=np.int32)
    # One example per row, --labelled scored positions per row (the real data has 5-6 labelled
    # tokens an example, so the trainer's head runs on about that many hidden states).
    batch = one_example_rows(jnp.asarray(ids), args.labelled)
    res = {"bench": "train_step", "model": "SmolLM2-135M shapes, random weights, nf4 base",
           "layers": args.layers, "batch": [args.batch, args.seq], "backend": jax.default_backend(),
           "cpu_count": os.cpu_count(), "adapted": "q_proj, v_proj", "variants": {}}
    for variant in ("frozen", "lora_r16", "moka"):
        res["variants"][variant] = time_variant(variant, args.layers, args.steps, batch)
    v = res["variants"]
    res["moka_params_over_lora_r16"] = v["moka"]["trainable_params"] / v["lora_r16"]["trainable_params"]
    res["moka_over_lora_step_time"] = v["moka"]["step_seconds"] / v["lora_r16"]["step_seconds"]
    res["moka_over_frozen_step_time"] = v["moka"]["step_seconds"] / v["frozen"]["step_seconds"]
    res["compilations"] = sum(x["compilations"] for x in v.values())
    res["peak_rss_bytes"] = peak_rss_bytes()
    res["targets"] = {"moka_over_lora_step_time": "<= 1.10", "moka_over_frozen_step_time": "<= 1.15"}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
