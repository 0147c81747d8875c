"""Where one SmolLM2 train step spends its time, JAX (timed compiled parts) and torch QLoRA
(torch.profiler), on CPU. SmolLM2-135M shapes, batch 8 x 256 (--batch, --seq).

JAX parts, each jitted alone and timed as the train step runs it (forward + the backward the
step needs, over all layers): embedding gather; attention core (scores, softmax, weighted sum,
in causal query blocks; the full score matrix is timed as an alternative);
base matmuls (nf4: dequantisation inside the matmul; f32 for the LoRA f32 variant), forward
and dx; adapters (MoKA r=4 or LoRA r=16 on q_proj, v_proj), forward, dx and dparams; lm_head +
cross-entropy over all B x T positions and over the labelled positions only; the AdamW update.
"rest" = the whole step minus the parts (norms, RoPE, SwiGLU, residuals, glue). The whole
step is timed with full logits (the old path) and labelled-only logits (the trainer's).
Torch: one PEFT QLoRA step (bitsandbytes nf4 + LoRA r=16) under torch.profiler, self CPU
time grouped by operator family. Random weights: speed does not depend on their values.
Last stdout line: one JSON object.

    python bench/profile_step.py [--repeats 3] [--layers 30] [--no-torch]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Self CPU time of torch ops, by family (first match wins).
TORCH_FAMILIES = [
    ("nf4 dequantisation", r"bitsandbytes|dequant|4bit|nf4"),
    ("lm_head + loss (without its matmul)", r"cross_entropy|log_softmax|nll_loss|LogSoftmax"),
    ("attention core", r"scaled_dot_product|flash_attention|softmax"),
    ("matmuls", r"aten::(mm|addmm|bmm|matmul|linear)"),
    ("embedding", r"embedding"),
    ("optimizer", r"adam|_foreach|lerp|addcdiv|addcmul"),
]
LABELLED_PER_ROW = 7  # the bench batch's 54 labelled tokens over 8 rows, rounded up


def jax_parts(variant: str, layers: int, B: int, T: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from moka_jax import nn, quant
    from moka_jax.adapters import LoRAConfig, MoKAConfig
    from moka_jax.models.llama import Llama, attend, attention_mask, causal_attend
    from moka_jax.training.step import TrainStep, one_example_rows, split_model, token_loss_sums
    from timing import median_seconds, xla_flops
    from moka_jax.models import presets

    nf4 = variant == "moka_nf4"
    c = presets.smollm2(layers)
    model = Llama(c, dtype=jnp.float32, quant="nf4" if nf4 else "none", rngs=nnx.Rngs(0))
    config = MoKAConfig(r=4) if nf4 else LoRAConfig(r=16, alpha=32)
    nn.attach_adapters(model, config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    D, H, N, K = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    x_BTD = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    parts, flops = {}, {}

    def median_time(fn, args, repeats, part=None, scale=1):
        """Seconds of one call (x scale: per-layer parts run `layers` times a step); XLA's
        flop count of the call, x scale, added to flops[part]."""
        if part is not None:
            f = xla_flops(fn, args)
            flops[part] = None if f is None or flops.get(part, 0.0) is None else \
                flops.get(part, 0.0) + scale * f
        return scale * median_seconds(fn, args, repeats)

    ids = jnp.asarray(rng.integers(0, c.vocab_size, (B, T)), jnp.int32)
    emb = model.embed.embedding.get_value()
    parts["embedding"] = median_time(jax.jit(lambda e, i: jnp.take(e, i, axis=0)), (emb, ids),
                                     repeats, "embedding")

    q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
    mask = attention_mask(jnp.ones((B, T), bool), jnp.arange(T), jnp.arange(T))

    def attn_fb(q, k, v, fn=causal_attend):
        y, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return vjp(y)
    parts["attention core"] = median_time(jax.jit(attn_fb), (q, k, k), repeats,
                                          "attention core", layers)
    # The same with jax.nn.dot_product_attention (XLA implementation): an alternative tried.
    mask_B1TS = mask[:, None]

    def dpa_fb(q, k, v):
        y, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=mask_B1TS, implementation="xla"), q, k, v)
        return vjp(y)
    alt = {"attention core, jax.nn.dot_product_attention":
           layers * median_time(jax.jit(dpa_fb), (q, k, k), repeats),
           "attention core, full score matrix (before query blocks)":
           layers * median_time(jax.jit(lambda q, k, v: attn_fb(q, k, v, attend)), (q, k, k),
                                repeats)}

    block = model.layers[0]
    lins = [block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj,
            block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj]
    base_t = adapter_t = 0.0
    for lin in lins:
        xin = jnp.asarray(rng.standard_normal((B, T, lin.in_features)), jnp.float32)
        kern = lin.kernel.get_value()
        matmul = ((lambda x, w: quant.quant_matmul(x, w, jnp.float32)) if nf4
                  else (lambda x, w: x @ w))

        def base_fb(x, w, matmul=matmul):
            y, vjp = jax.vjp(lambda x: matmul(x, w), x)
            return vjp(y)
        base_t += median_time(jax.jit(base_fb), (xin, kern), repeats, "base matmuls", layers)
        if lin.adapter is not None:
            gd, st = nnx.split(lin.adapter)

            def ad_fb(x, st, gd=gd):
                y, vjp = jax.vjp(lambda x, st: nnx.merge(gd, st).delta(x), x, st)
                return vjp(y)
            adapter_t += median_time(jax.jit(ad_fb), (xin, st), repeats, "adapters", layers)
    parts["base matmuls" + (" (nf4)" if nf4 else " (f32)")] = base_t
    flops["base matmuls" + (" (nf4)" if nf4 else " (f32)")] = flops.pop("base matmuls")
    parts["adapters"] = adapter_t

    tgt = jnp.asarray(rng.integers(0, c.vocab_size, (B, T)), jnp.int32)

    def head_loss(x, labels):
        logits = model.embed.attend(x).astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(nll)
    head_fb = jax.jit(jax.grad(head_loss))
    parts["lm_head + loss, all positions"] = median_time(head_fb, (x_BTD, tgt), repeats,
                                                         "lm_head + loss, all positions")
    C = LABELLED_PER_ROW
    parts["lm_head + loss, labelled only"] = median_time(head_fb, (x_BTD[:, :C], tgt[:, :C]),
                                                         repeats, "lm_head + loss, labelled only")

    graphdef, params, frozen = split_model(model)
    tx = optax.adamw(2e-4)
    opt = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    parts["optimizer"] = median_time(jax.jit(lambda g, o, p: tx.update(g, o, p)),
                                     (grads, opt, params), repeats, "optimizer")

    batch = one_example_rows(ids[None], C)

    class FullLogitsStep(TrainStep):
        def _loss_sums(self, params, frozen, batch):
            m = nnx.merge(self.graphdef, params, frozen)
            labels = jnp.where(jnp.arange(T) < C + 1, batch["input_ids"], -100)
            return token_loss_sums(m(batch["input_ids"]), labels)

    whole = {}
    for name, cls in (("full logits", FullLogitsStep), ("labelled only", TrainStep)):
        step = cls(graphdef, tx)
        p, o = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, opt)
        state = {"p": p, "o": o}

        def run(b, step=step, state=state):
            state["p"], state["o"], m = step(state["p"], state["o"], frozen, b)
            return m["loss"]
        whole[name] = median_time(run, (batch,), repeats)
    core = sum(v for key, v in parts.items() if "labelled only" not in key)
    parts["rest (norms, RoPE, SwiGLU, residuals)"] = max(whole["full logits"] - core, 0.0)
    return {"parts_seconds": parts, "parts_xla_flops": flops, "alternatives_seconds": alt,
            "step_seconds": whole,
            "trainable_params": nn.count_params(model)}


def torch_profile(layers: int, B: int, T: int) -> dict:
    """One QLoRA step under torch.profiler (run in a child: torch and jax apart)."""
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    import peft

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    hf = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                  num_hidden_layers=layers, num_attention_heads=9,
                                  num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                                  tie_word_embeddings=True)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        transformers.LlamaForCausalLM(hf).save_pretrained(tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
        task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, 49152, (B, T))
    labels = ids.clone()
    labels[:, LABELLED_PER_ROW + 1:] = -100

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    step()
    t0 = time.perf_counter()
    step()
    plain = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    fam = {name: 0.0 for name, _ in TORCH_FAMILIES}
    fam["other"] = 0.0
    for ev in prof.key_averages():
        sec = ev.self_cpu_time_total / 1e6
        for name, pat in TORCH_FAMILIES:
            if re.search(pat, ev.key, re.I):
                fam[name] += sec
                break
        else:
            fam["other"] += sec
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    from moka_jax.support import machine

    return {"step_seconds": plain, "families_self_cpu_seconds": fam,
            "kernels": machine.torch_kernels(),
            "top_ops": [(e.key, e.self_cpu_time_total / 1e6) for e in top],
            "torch_threads": torch.get_num_threads()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.torch_child:
        print(json.dumps(torch_profile(args.layers, args.batch, args.seq)))
        return
    from moka_jax.support import machine

    res = {"bench": "profile_step", "batch": [args.batch, args.seq], "layers": args.layers,
           "machine": machine.describe(), "jax_kernels": machine.jax_kernels(), "jax": {}}
    for variant in ("moka_nf4", "lora_f32"):
        res["jax"][variant] = jax_parts(variant, args.layers, args.batch, args.seq, args.repeats)
    if not args.no_torch:
        out = subprocess.run([sys.executable, __file__, "--torch-child", "--layers",
                              str(args.layers), "--batch", str(args.batch), "--seq",
                              str(args.seq)], stdout=subprocess.PIPE, text=True, check=True)
        res["torch_qlora"] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(res))


if __name__ == "__main__":
    main()
