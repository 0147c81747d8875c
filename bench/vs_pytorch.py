"""JAX vs PyTorch, one training step on CPU: SmolLM2-135M-Instruct, batch 8 x 256 of real data.

One step = forward + backward + AdamW (lr 2e-4, weight decay 0) on the adapters of q_proj and
v_proj; every variant trains on the same batch (commonsense_train examples, seed 0, padded /
truncated to --seq, prompt tokens masked out of the labels). Variants:
  - jax_moka_nf4:    MoKA r=4 (library default MoKAConfig, ~1/4 of LoRA r=16's params) on an
                     nf4 base, the trainer's TrainStep;
  - torch_qlora_nf4: the QLoRA recipe: transformers BitsAndBytesConfig(load_in_4bit, nf4,
                     compute float32) + PEFT LoraConfig(r=16, alpha=32);
  - torch_moka_f32:  the PyTorch MoKA reference (moka_jax.torch_ref), same shapes as JAX, f32 base;
  - jax_lora_f32, torch_lora_f32: LoRA r=16 alpha=32 (moka_jax / PEFT), f32 base.
Each variant runs in its own subprocess, so its peak RSS (VmHWM; ru_maxrss off Linux) is its
own; torch children never import jax. Step time = median of --steps steps after --warmup steps
(JAX compiles in the first one: reported apart). tokens/s counts all batch x seq positions
(padding costs the same in every variant). No gradient checkpointing on either side; torch uses
all cores and transformers' default (sdpa) attention; JAX is pinned to the CPU too.
--tiny: a random 2-layer LLaMA with the byte tokenizer instead of SmolLM2 (a test of the whole
pipeline: its time is imports and compiles; bytes are ~3x longer than BPE tokens, hence
--seq 768 there).
Last stdout line: one JSON object.

    python bench/vs_pytorch.py [--steps 3] [--warmup 2] [--variants jax_moka_nf4,torch_qlora_nf4]
    python bench/vs_pytorch.py --tiny --batch 2 --steps 1 --warmup 1
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

# name -> (framework, adapter, base)
VARIANTS = {
    "jax_moka_nf4": ("jax", "moka", "nf4"),
    "torch_qlora_nf4": ("torch", "lora", "nf4"),
    "torch_moka_f32": ("torch", "moka", "f32"),
    "jax_lora_f32": ("jax", "lora", "f32"),
    "torch_lora_f32": ("torch", "lora", "f32"),
}
RATIOS = {"jax_moka_over_torch_qlora_step_time": ("jax_moka_nf4", "torch_qlora_nf4"),
          "jax_lora_over_torch_lora_f32_step_time": ("jax_lora_f32", "torch_lora_f32"),
          "jax_moka_over_torch_moka_f32_step_time": ("jax_moka_nf4", "torch_moka_f32")}
TARGETS = {"jax_moka_over_torch_qlora_step_time": "<= 0.67",
           "jax_lora_over_torch_lora_f32_step_time": "<= 1.0"}
ADAMW = {"lr": 2e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
LORA_R, LORA_ALPHA, MOKA_R = 16, 32, 4
SEED = 0
DATA = [f"data/commonsense_train/{n}/train.json"
        for n in ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")]
PER_FILE = 256  # examples read from each file; the batch is drawn from their union
NEEDS = {"jax": ("jax", "flax", "optax"), "torch": ("torch", "transformers"),
         "lora": ("peft",), "nf4": ("bitsandbytes",)}
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            tie_word_embeddings=True, rms_norm_eps=1e-5)


# ---- the parent: inputs, children, summary ---------------------------------------------------

def parse_variants(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        what = f"unknown variant(s) {', '.join(unknown)}" if unknown else "no variant given"
        raise ValueError(f"{what}; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def missing_packages(variants) -> list[str]:
    needed = {"transformers"}  # the tokenizer, always
    for v in variants:
        framework, adapter, base = VARIANTS[v]
        needed.update(NEEDS[framework])
        if framework == "torch":
            needed.update(NEEDS.get(adapter, ()) + NEEDS.get(base, ()))
    return sorted(p for p in needed if importlib.util.find_spec(p) is None)


def write_tiny(path: Path) -> Path:
    """A random 2-layer LLaMA + the byte tokenizer; widths are multiples of the nf4 block (64)."""
    import torch
    import transformers

    from moka_jax.data import byte_tokenizer

    torch.manual_seed(SEED)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def make_batch(model_dir: Path, batch: int, seq: int) -> dict:
    """`batch` examples that keep a response token within `seq`, drawn with SEED, padded to seq."""
    from transformers import AutoTokenizer

    from moka_jax import data as data_lib
    from moka_jax.config import resolve_path

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids, labels = [], []
    for f in DATA:
        records, _ = data_lib.load_records(resolve_path(f), limit=max(PER_FILE, batch))
        i, lab = data_lib.tokenize(records, tok, cutoff_len=seq)
        ids += i
        labels += lab
    order = np.random.default_rng(SEED).permutation(len(ids))
    keep = [int(i) for i in order if (labels[i] != data_lib.IGNORE).any()][:batch]
    if len(keep) < batch:
        raise data_lib.DataError(f"only {len(keep)} of {len(ids)} examples keep a response token "
                                 f"within --seq {seq} (in the others the prompt fills the row); "
                                 f"raise --seq")
    rows = data_lib.TokenizedData([ids[i] for i in keep], [labels[i] for i in keep],
                                  np.zeros(batch, np.int64), DATA)
    return data_lib.collate(rows, range(batch), [seq], pad_id=data_lib.pad_id(tok))


def moka_plan(model_dir: Path) -> dict:
    """MoKAConfig(r=MOKA_R)'s scale, gate and {HF module name: shapes} for the layers
    nn.attach_adapters targets by default, so the torch reference trains the JAX shapes."""
    from moka_jax.adapters import MoKAConfig
    from moka_jax.models.hf import hf_tensor_specs, read_config
    from moka_jax.nn import DEFAULT_TARGETS

    cfg = MoKAConfig(r=MOKA_R)
    layers = {s.hf_name.removesuffix(".weight"): cfg.layer_shapes(*s.shape, s.path)
              for s in hf_tensor_specs(read_config(model_dir))
              if s.kind == "linear" and re.search(DEFAULT_TARGETS, s.path)}
    return {"scale": cfg.scale, "gated": cfg.gated, "layers": layers}


def run_child(variant: str, spec_file: Path) -> dict:
    """The child's JSON (its last stdout line), or {"error": ...}; its stderr passes through."""
    env = {"JAX_PLATFORMS": "cpu", **os.environ}  # torch runs on the CPU: so does JAX
    proc = subprocess.run([sys.executable, __file__, "--worker", variant, str(spec_file)],
                          stdout=subprocess.PIPE, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode} (its traceback is on stderr above)"}
    return json.loads(lines[-1])


def summarise(args, variants, results, batch, model_name, at_start) -> dict:
    ok = {v: r for v, r in results.items() if "error" not in r}

    def first(key):
        return next((r[key] for r in ok.values() if key in r), None)

    res = {
        "bench": "vs_pytorch", "model": model_name, "batch": [args.batch, args.seq],
        "tokens_per_step": int(batch["attention_mask"].size),
        "real_tokens": int(batch["attention_mask"].sum()),
        "labelled_tokens": int((batch["labels"][:, 1:] != -100).sum()),
        "data": DATA, "seed": SEED, "steps": args.steps, "warmup": args.warmup,
        "adamw": ADAMW, "adapted": "q_proj, v_proj", "lora": {"r": LORA_R, "alpha": LORA_ALPHA},
        "moka": {"r": MOKA_R},
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": first("torch_threads"),
                    "jax_backend": first("jax_backend"),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), **at_start},
        "versions": {k: v for r in ok.values() for k, v in r.get("versions", {}).items()},
        "variants": results,
    }
    for name, (num, den) in RATIOS.items():
        res[name] = (ok[num]["step_seconds"] / ok[den]["step_seconds"]
                     if num in ok and den in ok else None)
    params = {v: r["trainable_params"] for v, r in ok.items()}
    lora = (params.get("jax_lora_f32") or params.get("torch_lora_f32")
            or params.get("torch_qlora_nf4"))
    moka = params.get("jax_moka_nf4") or params.get("torch_moka_f32")
    res["moka_params_over_lora_r16"] = moka / lora if moka and lora else None
    res["targets"] = TARGETS
    res["errors"] = sorted(v for v in variants if v not in ok)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first (>= 1: JAX compiles in the first)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (256; 768 with --tiny)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random LLaMA (byte tokenizer) instead of SmolLM2: a quick check")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a HF LLaMA directory instead of the cached SmolLM2-135M-Instruct")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    if args.seq is None:
        args.seq = 768 if args.tiny else 256
    try:
        variants = parse_variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    for name in ("steps", "batch", "seq", "warmup"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.tiny and args.model_dir:
        ap.error("--tiny and --model-dir are exclusive")
    if args.model_dir and not (args.model_dir / "config.json").is_file():
        ap.error(f"--model-dir {args.model_dir}: no config.json there (not a HF model directory)")
    missing = missing_packages(variants)
    if missing:
        ap.error(f"missing package(s) {', '.join(missing)} for variants {', '.join(variants)}")

    # A busy machine slows every variant, not evenly: the load average says how quiet it was.
    at_start = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "load_average_1m_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="vs_pytorch.") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            model_dir, model_name = write_tiny(tmp / "tiny"), "tiny random LLaMA (2 layers, d=64)"
        elif args.model_dir:
            model_dir, model_name = args.model_dir.resolve(), str(args.model_dir)
        else:
            from moka_jax.models.gguf import ensure_smollm2

            model_dir, model_name = ensure_smollm2(), "SmolLM2-135M-Instruct"
        from moka_jax.data import DataError

        try:
            batch = make_batch(model_dir, args.batch, args.seq)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        np.savez(tmp / "batch.npz", **batch)
        spec = {"model_dir": str(model_dir), "batch": str(tmp / "batch.npz"),
                "steps": args.steps, "warmup": args.warmup,
                "moka": moka_plan(model_dir) if "torch_moka_f32" in variants else None}
        (tmp / "spec.json").write_text(json.dumps(spec))
        results = {}
        for v in tqdm(variants, desc="variants"):
            results[v] = run_child(v, tmp / "spec.json")
    res = summarise(args, variants, results, batch, model_name, at_start)
    print(json.dumps(res))
    return 1 if res["errors"] else 0


# ---- the children: one variant each ----------------------------------------------------------

def worker(variant: str, spec_file: str) -> dict:
    import procstat  # bench/procstat.py (the worker runs as a script from bench/)

    spec = json.loads(Path(spec_file).read_text())
    with np.load(spec["batch"]) as f:
        batch = {k: f[k] for k in f.files}
    framework, adapter, base = VARIANTS[variant]
    t0 = time.perf_counter()
    step, info = (run_jax if framework == "jax" else run_torch)(variant, spec, batch)
    info["load_seconds"] = time.perf_counter() - t0
    times, losses = [], []
    for _ in tqdm(range(spec["warmup"] + spec["steps"]), desc=variant, leave=False):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    timed = times[spec["warmup"]:]
    t = statistics.median(timed)
    if framework == "jax":  # the first call traces and compiles, then runs one step
        info["compile_seconds"] = max(times[0] - t, 0.0)
    return {"framework": framework, "adapter": adapter, "base": base, **info,
            "step_seconds": t, "step_seconds_each": timed, "first_step_seconds": times[0],
            "tokens_per_s": int(batch["attention_mask"].size) / t, "losses": losses,
            "peak_rss_bytes": procstat.peak_rss_bytes()}


def run_jax(variant: str, spec: dict, batch: dict):
    """(step() -> loss, info) with the trainer's TrainStep."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from moka_jax import nn
    from moka_jax.adapters import LoRAConfig, MoKAConfig
    from moka_jax.models.hf import load_hf
    from moka_jax.train.step import TrainStep, split_model

    _, adapter, base = VARIANTS[variant]
    model, _ = load_hf(spec["model_dir"], quant="nf4" if base == "nf4" else "none",
                       dtype=jnp.float32)
    config = MoKAConfig(r=MOKA_R) if adapter == "moka" else LoRAConfig(r=LORA_R, alpha=LORA_ALPHA)
    nn.attach_adapters(model, config, rngs=nnx.Rngs(SEED))
    n_params = nn.count_params(model)
    graphdef, params, frozen = split_model(model)
    del model
    tx = optax.adamw(ADAMW["lr"], ADAMW["b1"], ADAMW["b2"], ADAMW["eps"],
                     weight_decay=ADAMW["weight_decay"])
    state = {"params": params, "opt": tx.init(params)}
    train_step = TrainStep(graphdef, tx)
    batch = {k: jnp.asarray(v[None]) for k, v in batch.items()}  # one micro-batch

    def step():
        state["params"], state["opt"], m = train_step(state["params"], state["opt"], frozen, batch)
        jax.block_until_ready((state["params"], state["opt"], m))
        return float(m["loss"])

    return step, {"trainable_params": n_params, "jax_backend": jax.default_backend(),
                  "adapter_config": dataclasses.asdict(config),
                  "versions": {"jax": jax.__version__, "flax": _version("flax"),
                               "optax": optax.__version__}}


def _standalone(name: str):
    """moka_jax/<name>.py without the package __init__, which imports jax (~160 MB of RSS that
    would be billed to a torch variant)."""
    pkg = importlib.util.find_spec("moka_jax").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location(f"_moka_jax_{name}", Path(pkg) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_moka(model, plan: dict):
    """Wrap each nn.Linear of the plan in AdaptedLinear(base, TorchMoKA) with its shapes."""
    torch_ref = _standalone("torch_ref")
    model.requires_grad_(False)
    for name, shapes in plan["layers"].items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        adapter = torch_ref.TorchMoKA(base.in_features, base.out_features,
                                      [tuple(map(tuple, s)) for s in shapes], plan["scale"],
                                      plan["gated"])
        setattr(parent, child, torch_ref.AdaptedLinear(base, adapter))
    return model


def run_torch(variant: str, spec: dict, batch: dict):
    """(step() -> loss, info): transformers model (+ bitsandbytes nf4) + PEFT LoRA or the
    torch_ref MoKA, torch.optim.AdamW, the loss of moka_jax.compare."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(SEED)
    _, adapter, base = VARIANTS[variant]
    kw = {"dtype": torch.float32}
    if base == "nf4":
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kw)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if adapter == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM"))
        versions["peft"] = peft.__version__
    else:
        model = torch_moka(model, spec["moka"])
    if base == "nf4":
        versions["bitsandbytes"] = _version("bitsandbytes")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                            eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    torch_loss = _standalone("compare").torch_loss
    batch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(model, batch)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, {"trainable_params": sum(p.numel() for p in params),
                  "torch_threads": torch.get_num_threads(),
                  "attn_implementation": model.config._attn_implementation,
                  "versions": versions}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
