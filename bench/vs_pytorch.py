"""JAX vs PyTorch training on CPU, SmolLM2-135M-Instruct on real data: one fixed batch, and
one epoch with each framework's own data path. Both modes run by default.

Fixed batch (--mode fixed): one step = forward + backward + AdamW (lr 2e-4, weight decay 0) on
the adapters of q_proj and v_proj; every variant trains on the same batch of --batch examples
(commonsense_train, seed 0, padded / truncated to --seq, prompt tokens masked out of the
labels). Variants:
  - jax_moka_nf4:    MoKA r=4 (library default MoKAConfig, ~1/4 of LoRA r=16's params) on an
                     nf4 base, the trainer's TrainStep (labelled-only logits);
  - torch_qlora_nf4: the QLoRA recipe: transformers BitsAndBytesConfig(load_in_4bit, nf4,
                     compute float32) + PEFT LoraConfig(r=16, alpha=32);
  - torch_moka_f32:  the PyTorch MoKA reference (moka_jax.parity.torch_ref), same shapes as JAX, f32 base;
  - jax_lora_f32, torch_lora_f32: LoRA r=16 alpha=32 (moka_jax / PEFT), f32 base.
Step time = median of --steps steps after --warmup steps (JAX compiles in the first one:
reported apart). tokens/s there counts all batch x seq positions.

One epoch (--mode epoch): the first --epoch-examples examples of the same shuffled mix, in the
same order, once. Torch runs its standard recipe: DataCollatorForSeq2Seq padding to the longest
example of each batch of --batch, full logits. JAX runs the trainer's data path: packed rows
(--pack-rows rows of --seq tokens per step, first fit in order) and labelled-only logits. One
warm-up step first (JAX compiles there), then the adapters and optimizer are reset and the
whole epoch is timed; useful tokens/s counts real (non-pad) tokens.

Each variant runs in its own subprocess, so its peak RSS (VmHWM; ru_maxrss off Linux) is its
own; torch children never import jax. No gradient checkpointing on either side; torch uses
all cores and transformers' default (sdpa) attention; JAX is pinned to the CPU too. The JSON
records the CPU model, its vector extensions and each framework's kernel libraries.
--tiny: a random 2-layer LLaMA with the byte tokenizer instead of SmolLM2 (a test of the whole
pipeline: its time is imports and compiles; bytes are ~3x longer than BPE tokens, hence
--seq 768 there).
Last stdout line: one JSON object.

    python bench/vs_pytorch.py                      # both modes, all fixed-batch variants
    python bench/vs_pytorch.py --mode epoch --epoch-examples 512
    python bench/vs_pytorch.py --tiny --batch 2 --steps 1 --warmup 1 --epoch-examples 8
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
EPOCH_RATIOS = {"jax_moka_over_torch_qlora_epoch_time": ("jax_moka_nf4", "torch_qlora_nf4"),
                "jax_lora_over_torch_lora_f32_epoch_time": ("jax_lora_f32", "torch_lora_f32")}
TARGETS = {"jax_moka_over_torch_qlora_epoch_time": "<= 0.67",
           "jax_moka_over_torch_qlora_step_time": "<= 0.67",
           "jax_lora_over_torch_lora_f32_step_time": "<= 1.0",
           "peak RSS": "ours <= torch QLoRA's"}
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


def tokenized_mix(model_dir: Path, n: int, seq: int):
    """(tokenizer, ids, labels): the first `n` examples of the shipped mix (PER_FILE from each
    file, shuffled with SEED) that keep a response token within `seq`."""
    from transformers import AutoTokenizer

    from moka_jax import data as data_lib
    from moka_jax.config import resolve_path

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids, labels = [], []
    for f in DATA:
        records, _ = data_lib.load_records(resolve_path(f), limit=max(PER_FILE, n))
        i, lab = data_lib.tokenize(records, tok, cutoff_len=seq)
        ids += i
        labels += lab
    order = np.random.default_rng(SEED).permutation(len(ids))
    keep = [int(i) for i in order if (labels[i] != data_lib.IGNORE).any()][:n]
    if len(keep) < n:
        raise data_lib.DataError(f"only {len(keep)} of {len(ids)} examples keep a response token "
                                 f"within --seq {seq} (in the others the prompt fills the row); "
                                 f"raise --seq")
    return tok, [ids[i] for i in keep], [labels[i] for i in keep]


def make_batch(model_dir: Path, batch: int, seq: int) -> dict:
    """`batch` examples of the mix, padded to seq (the fixed-batch mode's one batch)."""
    from moka_jax import data as data_lib
    from moka_jax.data.batching import collate, with_label_slots

    tok, ids, labels = tokenized_mix(model_dir, batch, seq)
    rows = data_lib.TokenizedData(ids, labels, np.zeros(batch, np.int64), DATA)
    return with_label_slots(collate(rows, range(batch), [seq], pad_id=data_lib.pad_id(tok)))


def write_examples(model_dir: Path, n: int, seq: int, path: Path) -> int:
    """The epoch mode's examples, concatenated with their lengths; returns the pad id."""
    from moka_jax import data as data_lib

    tok, ids, labels = tokenized_mix(model_dir, n, seq)
    np.savez(path, input_ids=np.concatenate(ids), labels=np.concatenate(labels),
             lengths=np.array([len(x) for x in ids]))
    return data_lib.pad_id(tok)


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


def run_child(variant: str, spec_file: Path, mode: str = "fixed") -> dict:
    """The child's JSON (its last stdout line), or {"error": ...}; its stderr passes through."""
    env = {"JAX_PLATFORMS": "cpu", **os.environ}  # torch runs on the CPU: so does JAX
    flag = "--worker" if mode == "fixed" else "--epoch-worker"
    proc = subprocess.run([sys.executable, __file__, flag, variant, str(spec_file)],
                          stdout=subprocess.PIPE, text=True, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"exit status {proc.returncode} (its traceback is on stderr above)"}
    return json.loads(lines[-1])


def summarise(args, variants, results, batch, model_name, at_start, epoch=None) -> dict:
    ok = {v: r for v, r in results.items() if "error" not in r}

    def first(key):
        return next((r[key] for r in ok.values() if key in r), None)

    from moka_jax.models import llama
    from moka_jax.support import machine

    res = {
        "bench": "vs_pytorch", "model": model_name, "batch": [args.batch, args.seq],
        "data": DATA, "seed": SEED, "adamw": ADAMW, "adapted": "q_proj, v_proj",
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA}, "moka": {"r": MOKA_R},
        "jax_attention_block": args.attention_block or llama.ATTENTION_BLOCK,
        "machine": {**machine.cpu_info(), "torch_threads": first("torch_threads"),
                    "jax_backend": first("jax_backend"), "python": platform.python_version(),
                    **at_start},
        "kernels": {r["framework"]: r["kernels"] for r in list(ok.values())
                    + [r for r in (epoch or {}).values() if "error" not in r] if "kernels" in r},
        "versions": {k: v for r in ok.values() for k, v in r.get("versions", {}).items()},
    }
    if batch is not None:
        res["fixed_batch"] = {
            "tokens_per_step": int(batch["attention_mask"].size),
            "real_tokens": int(batch["attention_mask"].sum()),
            "labelled_tokens": int((batch["labels"][:, 1:] != -100).sum()),
            "steps": args.steps, "warmup": args.warmup, "variants": results}
        for name, (num, den) in RATIOS.items():
            res[name] = (ok[num]["step_seconds"] / ok[den]["step_seconds"]
                         if num in ok and den in ok else None)
        params = {v: r["trainable_params"] for v, r in ok.items()}
        lora = (params.get("jax_lora_f32") or params.get("torch_lora_f32")
                or params.get("torch_qlora_nf4"))
        moka = params.get("jax_moka_nf4") or params.get("torch_moka_f32")
        res["moka_params_over_lora_r16"] = moka / lora if moka and lora else None
    errors = [v for v in results if v not in ok]
    if epoch is not None:
        eok = {v: r for v, r in epoch.items() if "error" not in r}
        res["epoch"] = {"examples": args.epoch_examples, "pack_rows": args.pack_rows,
                        "torch_batch": args.batch, "variants": epoch}
        for name, (num, den) in EPOCH_RATIOS.items():
            res[name] = (eok[num]["epoch_seconds"] / eok[den]["epoch_seconds"]
                         if num in eok and den in eok else None)
        for v, r in eok.items():
            res[f"{v}_epoch_seconds"] = r["epoch_seconds"]
            res[f"{v}_useful_tokens_per_s"] = r["useful_tokens_per_s"]
            res[f"{v}_epoch_peak_rss_bytes"] = r["peak_rss_bytes"]
        errors += [f"epoch:{v}" for v in epoch if v not in eok]
    res["targets"] = TARGETS
    res["errors"] = sorted(errors)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("both", "fixed", "epoch"), default="both",
                    help="fixed: one padded batch, step time; epoch: one epoch of real data, "
                         "each framework's own data path; both (default)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps first (>= 1: JAX compiles in the first)")
    ap.add_argument("--batch", type=int, default=8,
                    help="examples per step: the fixed batch, and torch's epoch batches")
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (256; 768 with --tiny)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"fixed mode: comma-separated subset of {', '.join(VARIANTS)} (default: all)")
    ap.add_argument("--epoch-variants", default="jax_moka_nf4,torch_qlora_nf4",
                    help="epoch mode: the variants (default: JAX MoKA nf4 vs torch QLoRA)")
    ap.add_argument("--epoch-examples", type=int, default=256,
                    help="epoch mode: the first N examples of the shipped mix")
    ap.add_argument("--pack-rows", type=int, default=4,
                    help="epoch mode: packed rows of --seq tokens per JAX step")
    ap.add_argument("--attention-block", type=int, default=None,
                    help="JAX: query rows per causal attention block (default: the library's; a "
                         "value >= --seq computes the full score matrix)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny random LLaMA (byte tokenizer) instead of SmolLM2: a quick check")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a HF LLaMA directory instead of the cached SmolLM2-135M-Instruct")
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "SPEC"), help=argparse.SUPPRESS)
    ap.add_argument("--epoch-worker", nargs=2, metavar=("VARIANT", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    if args.epoch_worker:
        print(json.dumps(epoch_worker(*args.epoch_worker)))
        return 0
    if args.seq is None:
        args.seq = 768 if args.tiny else 256
    try:
        variants = parse_variants(args.variants) if args.mode != "epoch" else []
        epoch_variants = parse_variants(args.epoch_variants) if args.mode != "fixed" else []
    except ValueError as e:
        ap.error(str(e))
    for name in ("steps", "batch", "seq", "warmup", "epoch_examples", "pack_rows",
                 "attention_block"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})")
    if args.tiny and args.model_dir:
        ap.error("--tiny and --model-dir are exclusive")
    if args.model_dir and not (args.model_dir / "config.json").is_file():
        ap.error(f"--model-dir {args.model_dir}: no config.json there (not a HF model directory)")
    missing = missing_packages(variants + epoch_variants)
    if missing:
        ap.error(f"missing package(s) {', '.join(missing)} for variants "
                 f"{', '.join(variants + epoch_variants)}")

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
            from moka_jax.models.source import resolve_dir

            model_dir, model_name = resolve_dir("smollm2"), "SmolLM2-135M-Instruct"
        from moka_jax.data import DataError

        try:
            batch = make_batch(model_dir, args.batch, args.seq) if variants else None
            pad = (write_examples(model_dir, args.epoch_examples, args.seq, tmp / "examples.npz")
                   if epoch_variants else 0)
        except DataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if batch is not None:
            np.savez(tmp / "batch.npz", **batch)
        spec = {"model_dir": str(model_dir), "batch": str(tmp / "batch.npz"),
                "examples": str(tmp / "examples.npz"), "pad_id": pad, "seq": args.seq,
                "pack_rows": args.pack_rows, "torch_batch": args.batch,
                "steps": args.steps, "warmup": args.warmup,
                "attention_block": args.attention_block,
                "moka": (moka_plan(model_dir)
                         if "torch_moka_f32" in variants + epoch_variants else None)}
        (tmp / "spec.json").write_text(json.dumps(spec))
        results, epoch = {}, None
        for v in tqdm(variants, desc="fixed batch"):
            results[v] = run_child(v, tmp / "spec.json")
        if epoch_variants:
            epoch = {v: run_child(v, tmp / "spec.json", "epoch")
                     for v in tqdm(epoch_variants, desc="one epoch")}
    res = summarise(args, variants, results, batch, model_name, at_start, epoch)
    print(json.dumps(res))
    return 1 if res["errors"] else 0


# ---- the children: one variant each ----------------------------------------------------------

def _read_spec(spec_file: str) -> dict:
    """The parent's spec; its attention block (if any) set before any JAX step is traced."""
    spec = json.loads(Path(spec_file).read_text())
    if spec.get("attention_block"):
        from moka_jax.models import llama

        llama.ATTENTION_BLOCK = spec["attention_block"]
    return spec


def worker(variant: str, spec_file: str) -> dict:
    """One fixed batch, --warmup + --steps times: the step time."""
    import procstat  # bench/procstat.py (the worker runs as a script from bench/)

    spec = _read_spec(spec_file)
    with np.load(spec["batch"]) as f:
        host = {k: f[k] for k in f.files}
    framework, adapter, base = VARIANTS[variant]
    t0 = time.perf_counter()
    runner = (JaxRunner if framework == "jax" else TorchRunner)(variant, spec)
    info = dict(runner.info, load_seconds=time.perf_counter() - t0)
    batch = runner.prepare(host)
    times, losses = [], []
    for _ in tqdm(range(spec["warmup"] + spec["steps"]), desc=variant, leave=False):
        t0 = time.perf_counter()
        losses.append(runner.step(batch))
        times.append(time.perf_counter() - t0)
    timed = times[spec["warmup"]:]
    t = statistics.median(timed)
    if framework == "jax":  # the first call traces and compiles, then runs one step
        info["compile_seconds"] = max(times[0] - t, 0.0)
    return {"framework": framework, "adapter": adapter, "base": base, **info,
            "step_seconds": t, "step_seconds_each": timed, "first_step_seconds": times[0],
            "tokens_per_s": int(host["attention_mask"].size) / t, "losses": losses,
            "peak_rss_bytes": procstat.peak_rss_bytes()}


def epoch_worker(variant: str, spec_file: str) -> dict:
    """One epoch over the same examples, each framework with its own data path: the time."""
    import procstat

    spec = _read_spec(spec_file)
    examples = read_examples(spec["examples"])
    framework, adapter, base = VARIANTS[variant]
    runner = (JaxRunner if framework == "jax" else TorchRunner)(variant, spec)
    batches = runner.epoch_batches(examples, spec)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(int(b["attention_mask"].size) for b in batches)
    prepared = [runner.prepare(b) for b in batches]
    # Warm-up on the first batch (JAX compiles there), then back to the initial adapters and
    # a fresh optimizer, so the timed epoch is the whole epoch from the start.
    t0 = time.perf_counter()
    runner.reset_after(lambda: runner.step(prepared[0]))
    warm = time.perf_counter() - t0
    losses, t0 = [], time.perf_counter()
    for b in tqdm(prepared, desc=f"{variant} epoch", leave=False):
        losses.append(runner.step(b))
    seconds = time.perf_counter() - t0
    return {"framework": framework, "adapter": adapter, "base": base, **runner.info,
            "examples": len(examples["input_ids"]), "steps": len(batches),
            "rows_per_step": int(batches[0]["input_ids"].shape[0]),
            "real_tokens": real, "computed_tokens": padded, "padding_share": 1 - real / padded,
            "epoch_seconds": seconds, "warmup_step_seconds": warm,
            "useful_tokens_per_s": real / seconds, "mean_loss": float(np.mean(losses)),
            "compilations": runner.compilations(), "peak_rss_bytes": procstat.peak_rss_bytes()}


def read_examples(path) -> dict:
    with np.load(path) as f:
        cut = np.cumsum(f["lengths"])[:-1]
        return {"input_ids": np.split(f["input_ids"], cut), "labels": np.split(f["labels"], cut)}


class JaxRunner:
    """The trainer's TrainStep on an adapted SmolLM2; batches from the trainer's data path."""

    def __init__(self, variant: str, spec: dict):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx

        import moka_jax as mj
        from moka_jax.support import machine
        from moka_jax.training.step import TrainStep, split_model

        _, adapter, base = VARIANTS[variant]
        model, _ = mj.load(spec["model_dir"], quant="nf4" if base == "nf4" else "none",
                           dtype=jnp.float32)
        config = (mj.MoKAConfig(r=MOKA_R) if adapter == "moka"
                  else mj.LoRAConfig(r=LORA_R, alpha=LORA_ALPHA))
        mj.attach_adapters(model, config, rngs=nnx.Rngs(SEED))
        n_params = mj.count_params(model)
        graphdef, params, self.frozen = split_model(model)
        del model
        self.tx = optax.adamw(ADAMW["lr"], ADAMW["b1"], ADAMW["b2"], ADAMW["eps"],
                              weight_decay=ADAMW["weight_decay"])
        self.state = {"params": params, "opt": self.tx.init(params)}
        self.train_step = TrainStep(graphdef, self.tx)
        self.info = {"trainable_params": n_params, "jax_backend": jax.default_backend(),
                     "adapter_config": dataclasses.asdict(config),
                     "kernels": machine.jax_kernels(),
                     "versions": {"jax": jax.__version__, "flax": _version("flax"),
                                  "optax": optax.__version__}}

    def prepare(self, host: dict) -> dict:
        import jax.numpy as jnp

        from moka_jax.training.step import step_inputs

        return {k: jnp.asarray(v[None]) for k, v in step_inputs(host).items()}  # 1 micro-batch

    def step(self, batch) -> float:
        import jax

        s = self.state
        s["params"], s["opt"], m = self.train_step(s["params"], s["opt"], self.frozen, batch)
        jax.block_until_ready((s["params"], s["opt"], m))
        return float(m["loss"])

    def reset_after(self, fn):
        import jax
        import jax.numpy as jnp

        saved = jax.tree.map(jnp.copy, self.state["params"])  # the step donates its inputs
        fn()
        self.state = {"params": saved, "opt": self.tx.init(saved)}

    def epoch_batches(self, examples: dict, spec: dict) -> list[dict]:
        """The trainer's packed batches (rows of spec["seq"] tokens), examples in their order."""
        from moka_jax.data.batching import BatchIterator
        from moka_jax.data import TokenizedData

        n = len(examples["input_ids"])
        data = TokenizedData(examples["input_ids"], examples["labels"], np.zeros(n, np.int64),
                             ["mix"])
        it = BatchIterator(data, spec["pack_rows"], [spec["seq"]], seed=SEED,
                           pad_id=spec["pad_id"], shuffle=False, packing=True)
        return [next(it) for _ in range(it.steps_per_epoch)]

    def compilations(self) -> int:
        return self.train_step.compilations


class TorchRunner:
    """transformers (+ bitsandbytes nf4) + PEFT LoRA or the torch_ref MoKA, torch AdamW."""

    def __init__(self, variant: str, spec: dict):
        import torch
        import transformers

        from moka_jax.support import machine

        torch.set_num_threads(os.cpu_count())
        torch.manual_seed(SEED)
        _, adapter, base = VARIANTS[variant]
        kw = {"dtype": torch.float32}
        if base == "nf4":
            kw["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kw)
        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        if adapter == "lora":
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(
                r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
            versions["peft"] = peft.__version__
        else:
            model = torch_moka(model, spec["moka"])
        if base == "nf4":
            versions["bitsandbytes"] = _version("bitsandbytes")
        model.train()
        self.model, self.torch = model, torch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = self._optimizer()
        from moka_jax.parity.compare import torch_loss

        self.loss_fn = torch_loss
        self.info = {"trainable_params": sum(p.numel() for p in self.params),
                     "torch_threads": torch.get_num_threads(),
                     "attn_implementation": model.config._attn_implementation,
                     "kernels": machine.torch_kernels(), "versions": versions}

    def _optimizer(self):
        return self.torch.optim.AdamW(self.params, lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]),
                                      eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])

    def prepare(self, host: dict) -> dict:
        return {k: self.torch.as_tensor(np.asarray(host[k]), dtype=self.torch.long)
                for k in ("input_ids", "attention_mask", "labels")}

    def step(self, batch) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, batch)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def reset_after(self, fn):
        saved = [p.detach().clone() for p in self.params]
        fn()
        with self.torch.no_grad():
            for p, v in zip(self.params, saved):
                p.copy_(v)
        self.opt = self._optimizer()

    def epoch_batches(self, examples: dict, spec: dict) -> list[dict]:
        """The standard recipe: DataCollatorForSeq2Seq, padding to the longest of each batch."""
        from transformers import AutoTokenizer, DataCollatorForSeq2Seq

        tok = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
        collate = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100,
                                         return_tensors="np")
        feats = [{"input_ids": i.tolist(), "attention_mask": [1] * len(i), "labels": lab.tolist()}
                 for i, lab in zip(examples["input_ids"], examples["labels"])]
        B = spec["torch_batch"]
        return [dict(collate(feats[s:s + B])) for s in range(0, len(feats), B)]

    def compilations(self) -> int:
        return 0


def torch_moka(model, plan: dict):
    """Wrap each nn.Linear of the plan in AdaptedLinear(base, TorchMoKA) with its shapes.
    (`import moka_jax` imports no jax, so a torch variant's RSS holds none of it.)"""
    from moka_jax.parity import torch_ref

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


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
