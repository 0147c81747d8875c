"""The paper's scale on paper: trainable parameters on LLaMA-2-7B, LLaMA-3-8B, Qwen2.5-0.5B and
Qwen3-0.6B, no weights.

Layer shapes come from the standard Hugging Face config dims (below); MoKA / MoKAs shapes from
the project's planner with the settings of configs/llama2-7b-commonsense-moka.yaml /
configs/llama3-8b-commonsense-moka.yaml, configs/qwen2.5-0.5b-commonsense-moka.yaml,
configs/qwen3-0.6b-commonsense-moka.yaml (adapter section: kind, r, budget, targets), LoRA r=16
and DoRA r=8 as in the sweep; all at the paper's placement (q_proj and v_proj of every layer).
Beside them, the counts the paper reports, as quoted in this project's brief (second-hand:
not checked against the paper's PDF), and which LoRA placement the QLoRA count implies.

    python bench/paper_params.py            # markdown table; last line: one JSON object
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# config.json of meta-llama/Llama-2-7b-hf, meta-llama/Meta-Llama-3-8B, Qwen/Qwen2.5-0.5B and
# Qwen/Qwen3-0.6B (-Base). Qwen2 adds q/k/v biases, Qwen3 per-head q/k norms and a head_dim
# that is not hidden / heads; both tie the output head to the embedding.
MODELS = {
    "LLaMA-2-7B": {"config": "llama2-7b-commonsense-moka.yaml", "hidden_size": 4096,
                   "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "LLaMA-3-8B": {"config": "llama3-8b-commonsense-moka.yaml", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "Qwen2.5-0.5B": {"config": "qwen2.5-0.5b-commonsense-moka.yaml", "hidden_size": 896,
                     "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True, "qkv_bias": True},
    "Qwen3-0.6B": {"config": "qwen3-0.6b-commonsense-moka.yaml", "hidden_size": 1024,
                   "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                   "tie_word_embeddings": True, "qk_norm": True},
}
# As quoted in the issue (second-hand); the paper has no Qwen runs. MoKAs: a range.
PAPER = {"LLaMA-2-7B": {"QLoRA": 62.2e6, "MoKA": 5.2e6, "MoKAs": (2.1e6, 4.2e6)},
         "LLaMA-3-8B": {"QLoRA": 56.6e6, "MoKA": 3.9e6, "MoKAs": (2.1e6, 4.2e6)}}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# LoRA placements in common use, to see which one a reported count implies.
LORA_PLACEMENTS = {
    "r=16 on all 7 projections (QLoRA-style)": (16, PROJ),
    "r=32 on q, k, v, up, down (LLM-Adapters / DoRA commonsense)": (
        32, ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")),
    "r=64 on all 7 projections (QLoRA paper)": (64, PROJ),
}


def linear_shapes(dims: dict) -> dict[str, tuple[int, int]]:
    """{projection: (out m, in n)} of one decoder layer (PyTorch / paper convention)."""
    h, i = dims["hidden_size"], dims["intermediate_size"]
    q, kv = (heads * head_dim(dims) for heads in (dims["num_attention_heads"],
                                                  dims["num_key_value_heads"]))
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def head_dim(dims: dict) -> int:
    return dims.get("head_dim") or dims["hidden_size"] // dims["num_attention_heads"]


def adapter_params(adapter, m: int, n: int) -> int:
    """Trainable parameters of one adapter config on one (m, n) layer (the gate included)."""
    from moka_jax.core import shapes

    kind = adapter.kind
    if kind == "moka":
        comps = adapter.layer_shapes(m, n)
        return sum(shapes.moka_params(s) for s in comps) + (len(comps) if adapter.gated else 0)
    if kind == "mokas":
        primes = adapter.layer_primes(m, n)
        return sum(shapes.mokas_params(m, n, p) for p in primes) + (
            len(primes) if adapter.gated else 0)
    if kind == "lora":
        return adapter.r * (m + n)
    if kind == "dora":
        return adapter.r * (m + n) + m  # + the magnitude vector
    raise ValueError(f"unknown adapter kind {kind!r}")


def model_params(adapter, dims: dict, targets: str) -> int:
    pattern = re.compile(targets)
    per_layer = sum(adapter_params(adapter, m, n) for name, (m, n) in linear_shapes(dims).items()
                    if pattern.search(f"attn/{name}" if name[0] in "qkvo" else f"mlp/{name}"))
    return per_layer * dims["num_hidden_layers"]


def base_params(dims: dict) -> int:
    """Decoder linear layers (+ q/k/v biases) + norms (+ per-head q/k norms) + embeddings +
    lm_head unless tied."""
    h, n_layers, v = dims["hidden_size"], dims["num_hidden_layers"], dims["vocab_size"]
    shapes = linear_shapes(dims)
    per_layer = sum(m * n for m, n in shapes.values()) + 2 * h
    if dims.get("qkv_bias"):
        per_layer += sum(shapes[p][0] for p in ("q_proj", "k_proj", "v_proj"))
    if dims.get("qk_norm"):
        per_layer += 2 * head_dim(dims)
    heads = 1 if dims.get("tie_word_embeddings") else 2
    return n_layers * per_layer + heads * v * h + h


def lora_count(dims: dict, r: int, subset) -> int:
    from moka_jax.adapters import LoRAConfig

    targets = "(" + "|".join(subset) + ")$"
    return model_params(LoRAConfig(r=r), dims, targets)


def lora_placement_nearest(dims: dict, target: float, ranks=(8, 16, 32, 64)):
    """[(params, r, projections)] of every LoRA rank x subset of projections, nearest to
    `target` first (which placement could a reported count be?)."""
    out = [(lora_count(dims, r, subset), r, subset) for r in ranks
           for k in range(1, len(PROJ) + 1) for subset in itertools.combinations(PROJ, k)]
    return sorted(out, key=lambda x: abs(x[0] - target))


def methods_for(config_name: str):
    """{label: (adapter config, targets)}: the LLaMA config's MoKA (r from its YAML), MoKAs at
    three r (the paper's MoKAs is a range), LoRA r=16, DoRA r=8, all on its targets."""
    from moka_jax.adapters import DoRAConfig, LoRAConfig, MoKAsConfig
    from moka_jax.config import load_config

    cfg = load_config(REPO / "configs" / config_name, ["data.train=[data/commonsense_train/boolq/train.json]"])
    targets = cfg.adapter.targets
    moka = cfg.adapter.config
    out = {f"MoKA r={moka.r} (configs/{config_name})": (moka, targets)}
    for r in (2, 4, 8):
        out[f"MoKAs r={r}"] = (MoKAsConfig(r=r), targets)
    out["LoRA r=16"] = (LoRAConfig(r=16, alpha=32.0), targets)
    out["DoRA r=8"] = (DoRAConfig(r=8, alpha=16.0), targets)
    return out, targets


def table() -> tuple[str, dict]:
    rows, report = [], {}
    head = ["model", "method", "placement", "trainable params", "% of base", "/ LoRA r=16",
            "paper (second-hand)"]
    rows += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for model, dims in MODELS.items():
        methods, targets = methods_for(dims["config"])
        base = base_params(dims)
        counts = {k: model_params(a, dims, t) for k, (a, t) in methods.items()}
        lora = counts["LoRA r=16"]
        paper = PAPER.get(model)
        for label, n in counts.items():
            ref = ("-" if paper is None else f"{paper['MoKA'] / 1e6:.1f}M"
                   if label.startswith("MoKA r")
                   else f"{paper['MoKAs'][0] / 1e6:.1f}M-{paper['MoKAs'][1] / 1e6:.1f}M"
                   if label.startswith("MoKAs") else "-")
            rows.append(f"| {model} | {label} | `{targets}` | {n / 1e6:.2f}M | "
                        f"{100 * n / base:.3f}% | {n / lora:.3f} | {ref} |")
        placements = {}
        for label, (r, subset) in LORA_PLACEMENTS.items():
            n = lora_count(dims, r, subset)
            placements[label] = n
            qlora = "-" if paper is None else f"QLoRA {paper['QLoRA'] / 1e6:.1f}M"
            rows.append(f"| {model} | LoRA / QLoRA | {label} | {n / 1e6:.2f}M | "
                        f"{100 * n / base:.3f}% | {n / lora:.3f} | {qlora} |")
        report[model] = {"base_params": base, "counts": counts, "lora_placements": placements}
        if paper is None:
            continue
        near = lora_placement_nearest(dims, paper["QLoRA"])
        n, r, subset = near[0]
        report[model].update({
            "qlora_reported": paper["QLoRA"],
            "qlora_nearest": {"params": n, "r": r, "targets": list(subset),
                              "off_by": n - paper["QLoRA"]},
            "qlora_next": [{"params": x, "r": rr, "targets": list(s)} for x, rr, s in near[1:4]]})
    return "\n".join(rows), report


def main():
    md, report = table()
    print(md)
    print(json.dumps({"bench": "paper_params", **report}))


if __name__ == "__main__":
    main()
