"""The training loop: a planned run -> model + adapters -> sharded jitted steps -> checkpoints,
metrics, plots.

The plan (training.plan.plan_run: every check before a weight loads) comes in as an argument;
this module never imports it, so the checks sit above the loop and nothing climbs back.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from moka_jax import nn
from moka_jax.adapters import MoKA, MoKAs, adapter_config_to_dict
from moka_jax.api import load
from moka_jax.config import Config
from moka_jax.data.batching import BatchIterator, eval_batches
from moka_jax.data.records import pad_id
from moka_jax.io.adapter_format import write_adapter
from moka_jax.support.diskfull import as_disk_full, writing
from moka_jax.support.trees import local_numpy
from moka_jax.training import sharding
from moka_jax.training.checkpoint import TrainCheckpointer, list_steps
from moka_jax.training.guard import ZeroGradWatch, divergence
from moka_jax.training.interrupt import Interrupted, deferred_signals, signal_name
from moka_jax.training.metrics import MetricsWriter, plot_gates, plot_loss, read_metrics
from moka_jax.training.optim import gate_entropy, lr_schedule, make_optimizer
from moka_jax.training.step import TrainStep, split_model, step_inputs

class TrainingDiverged(RuntimeError):
    pass


def gate_weights(model) -> dict[str, np.ndarray]:
    """{layer path: alpha} for every gated MoKA / MoKAs adapter."""
    out = {}
    for path, layer in nn.linear_paths(model):
        a = layer.adapter
        if isinstance(a, MoKA | MoKAs) and a.gated:
            out[path] = np.asarray(a.alpha())
    return out


def train(cfg: Config, plan, *, max_steps: int | None = None, quiet: bool = False) -> dict:
    """Run (or resume) training. plan: a training.plan.RunPlan of this cfg (plan_run). max_steps
    stops early (as a crash would), for tests."""
    is_main = jax.process_index() == 0
    out_dir = plan.out_dir
    ckpt = TrainCheckpointer(out_dir, plan.fingerprint, keep_last=cfg.train.keep_last)
    ckpt.check_same_run()

    tokenizer = plan.tokenizer
    train_data, val_data = plan.train_data, plan.val_data
    pad = pad_id(tokenizer)
    batches = BatchIterator(train_data, cfg.train.batch_size, cfg.data.buckets,
                            seed=cfg.data.seed, pad_id=pad, packing=cfg.data.packing)

    model, _ = load(cfg.model, tokenizer=tokenizer, progress=True)  # the one loader
    targets = nn.attach_adapters(model, cfg.adapter.config, cfg.adapter.targets,
                                 rngs=nnx.Rngs(params=cfg.train.seed))
    n_train, n_base = nn.count_params(model), nn.base_param_count(model)

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    graphdef, params, frozen = split_model(model)
    del model
    frozen = sharding.place_frozen(frozen, mesh)
    params = sharding.replicate(params, mesh)
    tx = make_optimizer(cfg.train)
    schedule = lr_schedule(cfg.train)  # for logging only; the optimizer holds its own
    opt_state = sharding.replicate(tx.init(params), mesh)
    step_fn = TrainStep(graphdef, tx)

    start = 0
    if plan.resume_step is not None:  # the newest intact step (damaged newer ones set aside)
        params, opt_state, meta = ckpt.restore(params, opt_state)
        start = int(meta["step"])
        # the data position must match the step, unless the data changed (then it cannot)
        batches.restore(meta["data"], None if plan.data_changes else start)

    writer = MetricsWriter(out_dir, enabled=is_main, keep_through=start)  # no step twice
    run_meta = {"inputs": plan.inputs}  # each checkpoint names the data it was trained on
    if plan.data_changes:  # accepted by train.allow_data_change: recorded in the run
        run_meta["data_changes"] = plan.data_changes
        if plan.data_changes[-1]["step"] == start:  # accepted by this start
            writer.write(start, data_changed=plan.data_changes[-1]["changes"])
    summary = {"run_dir": str(out_dir), "trainable_params": n_train, "base_params": n_base,
               "trainable_ratio": n_train / n_base, "adapted_layers": len(targets),
               "adapter": cfg.adapter.kind, "resumed_from": start}
    if is_main and not quiet:
        print(f"[moka_jax] {cfg.adapter.kind} on {len(targets)} layers: trainable params "
              f"{n_train:,} = {100 * n_train / n_base:.4f}% of the base's {n_base:,}"
              + (f"; resuming at step {start}" if start else ""))

    total = cfg.train.steps if max_steps is None else min(cfg.train.steps, max_steps)
    losses = []
    bar = tqdm(range(start, total), initial=start, total=cfg.train.steps, disable=not is_main
               or quiet, desc=cfg.name or "train", dynamic_ncols=True)
    t_last, tok_acc, lengths_seen = time.perf_counter(), 0, set()
    # Step metrics stay on the device until a log, save or the end needs them, so the host
    # builds and places the next batch while the device runs this step. Every loss is
    # checked before a checkpoint is written, so a NaN never reaches a saved step.
    pending = []

    # index of the first update with a non-zero lr (warm-up starts at 0), computed once
    first_update = next((i for i in range(3) if float(schedule(i)) > 0), 3)
    zero_grads = ZeroGradWatch(warn=lambda msg: print(msg, file=sys.stderr) if is_main else None)

    def sync():
        for s, m in pending:
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            # the lr is read back (eagerly) only when a check needs it, not on every step
            reason = divergence(s, loss, grad_norm, lambda: float(schedule(s - 1)),
                                updates_before=max(0, s - 1 - first_update))
            if reason is not None:
                last = ckpt.latest_step()
                ckpt.close()
                raise TrainingDiverged(f"{reason}. Stopping; the last good checkpoint (step "
                                       f"{last}) in {ckpt.dir} is kept.")
            zero_grads(s, grad_norm, lambda: float(schedule(s - 1)))
            losses.append(loss)
        last_m = pending[-1][1] if pending else None
        pending.clear()
        return last_m

    def intact() -> str:
        last = next(iter(list_steps(ckpt.dir)), None)  # finalised on disk, not in flight
        return (f"checkpoint step {last} in {ckpt.dir} is intact; the same command resumes "
                "from it" if last is not None else "no checkpoint was written yet")

    try:
        with deferred_signals(jax.process_count() == 1) as stop:
            for step in bar:
                batch = next(batches)
                lengths_seen.add(batch["input_ids"].shape[1])
                tok_acc += int(batch["attention_mask"].sum())
                placed = sharding.place_batch(step_inputs(batch), mesh, cfg.train.grad_accum)
                params, opt_state, m = step_fn(params, opt_state, frozen, placed)
                done = step + 1
                pending.append((done, m))
                # read once: a signal logs and saves this step, then stops (nothing lost)
                stopping = stop.signum is not None
                log_now = done % cfg.train.log_every == 0 or done == total or stopping
                val_now = val_data is not None and cfg.train.eval_every and \
                    done % cfg.train.eval_every == 0
                save_now = (cfg.train.save_every and done % cfg.train.save_every == 0) or \
                    done == cfg.train.steps or stopping
                if not (log_now or val_now or save_now):
                    continue
                m = sync()
                if log_now:
                    now = time.perf_counter()
                    lr = float(schedule(done - 1))
                    rec = {"loss": losses[-1], "lr": lr, "grad_norm": float(m["grad_norm"]),
                           "tokens_per_s": tok_acc / (now - t_last)}
                    entropy = gate_entropy(params)  # MoKA only: are the gates moving?
                    if entropy is not None:
                        rec["gate_entropy"] = entropy
                    writer.write(done, **rec)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}",
                                    tok_s=f"{rec['tokens_per_s']:.0f}")
                    t_last, tok_acc = now, 0
                if val_now:
                    writer.write(done, val_loss=evaluate(step_fn, params, frozen, val_data, cfg,
                                                         mesh, pad))
                if save_now:
                    ckpt.save(done, params, opt_state, batches.state(), run_meta)
                if stopping and done < cfg.train.steps:
                    stop.after = f"step {done} may be incomplete; {intact()}"
                    writer.flush()
                    ckpt.close()
                    bar.close()
                    resume = "" if cfg.train.resume else " with --set train.resume=true"
                    raise Interrupted(stop.signum, (
                        f"interrupted by {signal_name(stop.signum)}: saved checkpoint step "
                        f"{done} in {ckpt.dir}; run the same command{resume} to resume from it"))
            sync()
            ckpt.close()
    except Exception as e:
        full = as_disk_full(e, out_dir, intact())
        if full is None:
            raise
        raise full from None
    summary["losses"] = losses
    summary["compilations"] = step_fn.compilations
    summary["buckets_seen"] = sorted(lengths_seen)
    summary["final_step"] = start + len(losses)

    if summary["final_step"] == cfg.train.steps and val_data is not None and cfg.train.eval_every:
        summary["val_loss"] = evaluate(step_fn, params, frozen, val_data, cfg, mesh, pad)
    model = nnx.merge(graphdef, params, frozen)
    if is_main and summary["final_step"] == cfg.train.steps:
        # Host copies first: on a multi-host run eager math on global arrays would wait for
        # the other processes, which do not run this block.
        local = local_numpy(params)
        with writing(out_dir, f"checkpoint step {cfg.train.steps} in {ckpt.dir} is intact"):
            summary.update(finish(cfg, plan, nnx.merge(graphdef, local, frozen), local, writer))
    writer.close()
    if is_main and not quiet:
        print("[moka_jax] summary " + json.dumps({k: v for k, v in summary.items()
                                                   if k != "losses"}))
    summary["model"] = model
    return summary


def evaluate(step_fn, params, frozen, val_data, cfg, mesh, pad) -> float:
    bs = cfg.train.batch_size // cfg.train.grad_accum
    loss_sum, n = 0.0, 0
    for i, batch in enumerate(eval_batches(val_data, bs, cfg.data.buckets, pad,
                                           packing=cfg.data.packing)):
        if cfg.train.eval_batches is not None and i >= cfg.train.eval_batches:
            break
        s, c = step_fn.eval_sums(params, frozen, sharding.place_batch(step_inputs(batch), mesh))
        loss_sum, n = loss_sum + float(s), n + int(c)
    return loss_sum / max(n, 1)


def finish(cfg, plan, model, params, writer) -> dict:
    """Adapter export, loss-curve and gate-heatmap PNGs (main process only)."""
    out_dir, source = plan.out_dir, plan.source
    # Everything that changes the dequantised base the adapter was trained against.
    base = {"path": cfg.model.path if source is None else str(source), "quant": cfg.model.quant,
            "block_size": cfg.model.block_size, "double_quant": cfg.model.double_quant,
            "int4_symmetric": cfg.model.int4_symmetric,
            "tiny": dataclasses.asdict(cfg.model.tiny) if source is None else None}
    adapter_dir = write_adapter(out_dir / "adapter", params,
                                adapter_config=adapter_config_to_dict(cfg.adapter.config),
                                targets=cfg.adapter.targets, base=base, owner=plan.fingerprint,
                                data={"template": cfg.data.template})
    out = {"adapter_dir": str(adapter_dir)}
    writer.flush()
    records = read_metrics(out_dir / "metrics.jsonl")
    out["loss_png"] = str(plot_loss(records, out_dir / "loss.png", f"{cfg.name}: loss"))
    gates = gate_weights(model)
    if gates:
        out["gates_png"] = str(plot_gates(gates, out_dir / "gates.png",
                                          f"{cfg.name}: MoKA gate weights per layer"))
        (out_dir / "gates.json").write_text(json.dumps({k: v.tolist() for k, v in gates.items()}))
    return out
