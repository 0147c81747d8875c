"""Side by side with PyTorch: the same model, adapter, batches and AdamW in JAX and in torch.

    python -m moka_jax.cli.compare --config configs/tiny-debug.yaml [--steps 20] [--set k=v ...]

The JAX side is the trainer's own step (TrainStep + make_optimizer). The torch side is a
transformers model of the base's architecture (LlamaForCausalLM, Qwen2ForCausalLM, ...)
built from the JAX model's weights, with moka_jax.parity.torch_ref
adapters (factors copied from JAX) on the same Linear layers, and torch.optim.AdamW driven
by the same schedule and clipping. quant is forced to none and dtype to float32: a 4-bit
base and bf16 would make the two sides differ by their rounding, not by their math.
Prints per-step losses, the max relative loss difference and the steady-state step-time
ratio (torch / JAX); the last stdout line is one JSON object.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

FORCED = {"model.quant": "none", "model.dtype": "float32"}


# ---- torch side ------------------------------------------------------------------------------

def torch_model(jax_model, lconfig, adapted_paths):
    """(the transformers model with torch_ref adapters on `adapted_paths`, its trainable params,
    {path: torch adapter})."""
    import torch
    import transformers

    from moka_jax.models.hf import hf_tensor_specs, node_at, save_hf
    from moka_jax.parity.torch_ref import AdaptedLinear, from_jax

    # Through a real HF directory, so the weight layout is the one transformers loads.
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(jax_model, lconfig, f"{tmp}/base", merged=False)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            f"{tmp}/base", dtype=torch.float32, attn_implementation="eager")
    # No dropout in the family (attention_dropout > 0 is refused); train() only for
    # autograd-friendly defaults.
    model.train()
    model.requires_grad_(False)
    hf_module = {s.path: s.hf_name.removesuffix(".weight") for s in hf_tensor_specs(lconfig)
                 if s.kind == "linear"}
    params, adapters = [], {}
    for path in adapted_paths:
        name = hf_module[path]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        adapter = from_jax(node_at(jax_model, path).adapter)
        setattr(parent, child, AdaptedLinear(getattr(parent, child), adapter))
        params += list(adapter.parameters())
        adapters[path] = adapter
    return model, params, adapters


def torch_loss(model, batch):
    """Mean next-token NLL over labelled positions (token_loss_sums / count, as in JAX)."""
    import torch
    import torch.nn.functional as F

    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
    mask = torch.as_tensor(batch["attention_mask"], dtype=torch.long)
    labels = torch.as_tensor(batch["labels"], dtype=torch.long)[:, 1:]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=-100, reduction="sum")
    return nll / (labels != -100).sum().clamp(min=1)


def clip_like_optax(params, max_norm: float):
    """optax.clip_by_global_norm: g * max / norm when norm >= max. torch's clip_grad_norm_
    divides by (norm + 1e-6) instead, which would move every clipped step by ~1e-6."""
    import torch

    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)).float()
    if norm >= max_norm:
        for p in params:
            p.grad.mul_(max_norm / norm)


def train_torch(model, params, batches, tc, schedule) -> tuple[list, list]:
    """(losses, step seconds). lr is set to schedule(step) before each update, as optax's
    scale_by_schedule reads its count before incrementing it (step 0 uses schedule(0)).

    optax.adamw and torch.optim.AdamW agree exactly: both decay p by lr * wd * p (decoupled,
    with the current lr), and both add eps outside the square root of the bias-corrected
    second moment (optax eps_root = 0)."""
    import torch

    opt = torch.optim.AdamW(params, lr=0.0, betas=(tc.b1, tc.b2), eps=tc.eps,
                            weight_decay=tc.weight_decay, foreach=False)
    losses, times = [], []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = float(schedule(step))
        opt.zero_grad(set_to_none=False)
        loss = torch_loss(model, batch)
        loss.backward()
        if tc.grad_clip:
            clip_like_optax(params, tc.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
    return losses, times


# ---- JAX side --------------------------------------------------------------------------------

def train_jax(model, batches, cfg) -> tuple[list, list, list, object]:
    """(losses, step seconds, whether each step compiled, trained model), with the trainer's
    own step."""
    import jax
    from flax import nnx

    from moka_jax.training import sharding
    from moka_jax.training.optim import make_optimizer
    from moka_jax.training.step import TrainStep, split_model, step_inputs

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    graphdef, params, frozen = split_model(model)
    frozen = sharding.place_frozen(frozen, mesh)
    params = sharding.replicate(params, mesh)
    tx = make_optimizer(cfg.train)
    opt_state = sharding.replicate(tx.init(params), mesh)
    step_fn = TrainStep(graphdef, tx)
    losses, times, compiled = [], [], []
    for batch in batches:
        before = step_fn.compilations
        t0 = time.perf_counter()
        placed = sharding.place_batch(step_inputs(batch), mesh, cfg.train.grad_accum)
        params, opt_state, m = step_fn(params, opt_state, frozen, placed)
        losses.append(float(jax.block_until_ready(m["loss"])))
        times.append(time.perf_counter() - t0)
        compiled.append(step_fn.compilations != before)
    return losses, times, compiled, nnx.merge(graphdef, params, frozen)


# ---- the comparison --------------------------------------------------------------------------

def build(cfg, steps: int):
    """(JAX model with adapters, LlamaConfig, adapted paths, the first `steps` batches)."""
    from flax import nnx

    from moka_jax import nn
    from moka_jax.data import build_datasets, load_tokenizer, pad_id
    from moka_jax.data.batching import BatchIterator
    from moka_jax.api import load
    from moka_jax.training.plan import model_source, tokenizer_spec

    source = model_source(cfg)
    tokenizer = load_tokenizer(tokenizer_spec(cfg, source))
    train_data, _ = build_datasets(cfg.data, tokenizer)
    it = BatchIterator(train_data, cfg.train.batch_size, cfg.data.buckets,
                       seed=cfg.data.seed, pad_id=pad_id(tokenizer))
    batches = [next(it) for _ in range(steps)]
    model, _ = load(cfg.model, tokenizer=tokenizer)
    paths = nn.attach_adapters(model, cfg.adapter.config, cfg.adapter.targets,
                               rngs=nnx.Rngs(params=cfg.train.seed))
    return model, model.config, paths, batches


def dw_differences(trained, torch_adapters) -> dict:
    """After training: max over layers of |dW_jax - dW_torch| / |dW_torch| (Frobenius), and
    the smallest |dW|, which shows the adapters did move away from dW = 0."""
    import torch

    from moka_jax.models.hf import node_at

    rel, norms = [], []
    for path, ref in torch_adapters.items():
        with torch.no_grad():
            want = ref.delta_weight().double().numpy()
        got = np.asarray(node_at(trained, path).adapter.delta_weight(), np.float64)
        norms.append(float(np.linalg.norm(want)))
        rel.append(float(np.linalg.norm(got - want)) / max(norms[-1], 1e-30))
    return {"rel_diff": max(rel), "norm": min(norms)}


def compare(cfg, steps: int) -> dict:
    """Train `steps` steps in both frameworks from identical state; losses and timings."""
    import jax
    import torch

    from moka_jax.training.optim import lr_schedule

    # f32 parity: full-precision matmuls on both sides (JAX may otherwise use bf16 passes).
    jax.config.update("jax_default_matmul_precision", "highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    model, lconfig, paths, batches = build(cfg, steps)
    tmodel, tparams, tadapters = torch_model(model, lconfig, paths)  # before JAX donates
    j_loss, j_time, j_compiled, trained = train_jax(model, batches, cfg)
    t_loss, t_time = train_torch(tmodel, tparams, batches, cfg.train, lr_schedule(cfg.train))
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(j_loss, t_loss)]
    dw = dw_differences(trained, tadapters)
    j_steady = [t for t, c in zip(j_time, j_compiled) if not c] or j_time
    t_steady = t_time[1:] or t_time  # torch's first step warms its allocator / kernels
    return {
        "steps": steps, "adapter": cfg.adapter.kind, "adapted_layers": len(paths),
        "batch_size": cfg.train.batch_size, "seq_lens": [int(b["input_ids"].shape[1])
                                                         for b in batches],
        "loss_jax": j_loss, "loss_torch": t_loss, "rel_diff": rel,
        "max_rel_diff": max(rel), "jax_step_s": float(np.median(j_steady)),
        "torch_step_s": float(np.median(t_steady)),
        "time_ratio_torch_over_jax": float(np.median(t_steady) / np.median(j_steady)),
        "jax_compile_steps": int(sum(j_compiled)), "dw_rel_diff": dw["rel_diff"],
        "dw_norm": dw["norm"], "forced": FORCED,
    }


def forced_config(config_path, overrides=(), steps: int | None = None):
    """The config with quant none / float32 forced and train.steps = steps (so the lr
    schedule runs its whole course in the compared steps)."""
    from moka_jax.config import load_config

    forced = [f"{k}={v}" for k, v in FORCED.items()]
    if steps is not None:
        forced.append(f"train.steps={steps}")
    cfg = load_config(config_path, [*overrides, *forced])
    return cfg


def format_table(r: dict) -> str:
    lines = [f"{'step':>4}  {'loss jax':>12}  {'loss torch':>12}  {'rel diff':>9}"]
    for i, (a, b, d) in enumerate(zip(r["loss_jax"], r["loss_torch"], r["rel_diff"])):
        lines.append(f"{i + 1:>4}  {a:>12.7f}  {b:>12.7f}  {d:>9.2e}")
    return "\n".join(lines)
