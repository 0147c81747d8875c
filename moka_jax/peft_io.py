"""PEFT interchange: adapters leave as PEFT directories and PEFT LoRA / DoRA ones come in.

    export_peft(model, "out/", base_model_name_or_path="path/to/hf_base")
    meta, values = read_peft("peft_dir/", llama_config)     # then attach + load (adapter_io)

Out: LoRA and DoRA become one PEFT LoRA adapter (use_dora for DoRA). MoKA component i (and an
exact MoKAs component, kron(I_k, C)) becomes a PEFT LoKr adapter with w1 = scale * alpha_i * A_i
and w2 = B_i; a MoKA with r components is r LoKr adapters (more when layers of different
shapes need different decompose_factors), which PEFT sums when they are active together:
the first is written at the top of the directory (PEFT's "default"), the others in
subdirectories, as PeftModel.save_pretrained lays out several adapters; `peft_adapters.json`
lists them. `load_peft_model` loads and activates all of them. Whatever PEFT cannot express
(padded Kronecker shapes, MoKAs blocks that do not tile the weight, ...) is refused before
anything is written, naming the layer.
In: a PEFT LoRA directory (LoRA, DoRA, rsLoRA) over a LLaMA-family base. Options that would
change what the adapter computes and that moka-jax does not model are refused, by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from moka_jax import shapes as shapes_lib
from moka_jax.adapters import DoRA, LoRA, MoKA, MoKAs
from moka_jax.nn import linear_paths

PREFIX = "base_model.model."
INDEX_FILE = "peft_adapters.json"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class PeftError(ValueError):
    """An adapter PEFT cannot express, or a PEFT directory moka-jax cannot read."""


@dataclasses.dataclass
class PeftAdapter:
    """One PEFT adapter: its name, adapter_config.json and state dict (PEFT keys)."""

    name: str
    config: dict
    tensors: dict


def hf_module_map(llama_config) -> dict[str, str]:
    """Our layer path ('layers/0/attn/q_proj') -> the HF module ('model.layers.0.self_attn.q_proj')."""
    from moka_jax.models.hf import hf_tensor_specs

    return {s.path: s.hf_name.removesuffix(".weight") for s in hf_tensor_specs(llama_config)
            if s.kind == "linear"}


def _short_targets(paths: list[str], all_paths: list[str]) -> list[str] | None:
    """The last-name list (['q_proj', 'v_proj']) when it selects exactly `paths`, else None."""
    names = sorted({p.rsplit("/", 1)[-1] for p in paths})
    selected = {p for p in all_paths if p.rsplit("/", 1)[-1] in names}
    return names if selected == set(paths) else None


# ---- export ---------------------------------------------------------------------------------

def _kron_components(path: str, adapter) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(w1, w2)] with sum_i kron(w1_i, w2_i) == dW exactly, or a PeftError naming the layer."""
    m, n = adapter.m, adapter.n
    weights = np.asarray(adapter.alpha(), np.float64) * adapter.scale
    out = []
    if isinstance(adapter, MoKA):
        for i, (a, b) in enumerate(adapter.components()):
            (ma, na), (mb, nb) = a.shape, b.shape
            if ma * mb != m or na * nb != n:
                raise PeftError(
                    f"layer '{path}': MoKA component {i} A {tuple(a.shape)} x B {tuple(b.shape)} "
                    f"pads / truncates to the {m}x{n} weight; PEFT LoKr needs an exact "
                    "factorisation (train with adapter.exact=true, or explicit exact shapes)")
            out.append((weights[i] * np.asarray(a, np.float64), np.asarray(b, np.float64)))
        return out
    for i, (p, c) in enumerate(zip(adapter.primes, adapter.c)):
        k, q, _ = shapes_lib.mokas_block(m, n, p)
        if k * q != m or k * p != n:
            raise PeftError(
                f"layer '{path}': MoKAs component {i} ({k} blocks of {q}x{p}) covers "
                f"{k * q}x{k * p}, not the {m}x{n} weight exactly; PEFT LoKr cannot express "
                "the padding")
        out.append((weights[i] * np.eye(k), np.asarray(c[...], np.float64)))
    return out


def _lokr_groups(layers) -> list[tuple[str, int, list[tuple[str, np.ndarray, np.ndarray]]]]:
    """[(adapter name, decompose_factor, [(path, w1, w2)])]: component i of every layer in one
    adapter when one decompose_factor builds all its shapes, else one adapter per layer shape."""
    comps = {path: _kron_components(path, a) for path, a in layers}
    r = max(len(c) for c in comps.values())
    groups = []
    for i in range(r):
        members = [(p, a.m, a.n, *comps[p][i]) for p, a in layers if i < len(comps[p])]
        factors = []
        for p, m, n, w1, w2 in members:
            fs = shapes_lib.lokr_factors_by_shape(m, n).get((w1.shape, w2.shape))
            if fs is None:
                raise PeftError(
                    f"layer '{p}': component {i} has factors {w1.shape} x {w2.shape}, which "
                    f"PEFT LoKr never builds for a {m}x{n} weight (its w1 is "
                    "factorization(out, f) x factorization(in, f) for one decompose_factor f); "
                    "plan the shapes with adapter.exact=true")
            factors.append(set(fs))
        common = set.intersection(*factors)
        if common:
            groups.append((f"moka_{i}", min(common, key=lambda f: (f != -1, f)),
                           [(p, w1, w2) for p, _, _, w1, w2 in members]))
            continue
        by_shape: dict[tuple, list] = {}
        for (p, m, n, w1, w2), fs in zip(members, factors):
            by_shape.setdefault((m, n), []).append(((p, w1, w2), fs))
        for (m, n), items in by_shape.items():
            fs = set.intersection(*(f for _, f in items))
            if not fs:  # equal layer shapes, different factor shapes: explicit per-layer shapes
                raise PeftError(f"layer '{items[0][0][0]}': component {i} needs a different "
                                "decompose_factor than other layers of its shape")
            groups.append((f"moka_{i}_{m}x{n}", min(fs, key=lambda f: (f != -1, f)),
                           [it for it, _ in items]))
    return groups


def _lora_config(r, scaling, dora, modules, base) -> dict:
    alpha = scaling * r
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "target_modules": modules, "use_dora": dora, "use_rslora": False,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": base}


def _lokr_config(r, factor, modules, base) -> dict:
    # alpha = r: LoKr's scaling alpha / r is 1 (the mixture weight is folded into w1). PEFT
    # keeps w2 a full matrix only when r >= max(w2 dims) / 2.
    return {"peft_type": "LOKR", "task_type": "CAUSAL_LM", "r": r, "alpha": r,
            "target_modules": modules, "decompose_both": False, "decompose_factor": factor,
            "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True,
            "use_effective_conv2d": False, "inference_mode": True,
            "base_model_name_or_path": base}


def peft_adapters(model, base_model_name_or_path: str | None = None) -> list[PeftAdapter]:
    """The model's adapters as PEFT adapters (every check done; nothing written)."""
    hf = hf_module_map(model.config)
    all_paths = [p for p, _ in linear_paths(model)]
    layers = [(p, layer.adapter) for p, layer in linear_paths(model) if layer.adapter is not None]
    if not layers:
        raise PeftError("the model has no adapters to export")
    for p, a in layers:
        if p not in hf:
            raise PeftError(f"layer '{p}' has no Hugging Face module name")
        if not isinstance(a, LoRA | MoKA | MoKAs):
            raise PeftError(f"layer '{p}': a {type(a).__name__} adapter has no PEFT counterpart")
    out = []
    lora = [(p, a) for p, a in layers if isinstance(a, LoRA)]
    groups: dict[tuple, list] = {}
    for p, a in lora:
        kind = "dora" if isinstance(a, DoRA) else "lora"
        groups.setdefault((kind, a.r, a.scaling), []).append((p, a))
    for (kind, r, scaling), members in groups.items():
        tensors = {}
        for p, a in members:
            key = PREFIX + hf[p]
            tensors[f"{key}.lora_A.weight"] = np.asarray(a.lora_a[...], np.float32)
            tensors[f"{key}.lora_B.weight"] = np.asarray(a.lora_b[...], np.float32)
            if kind == "dora":
                tensors[f"{key}.lora_magnitude_vector"] = np.asarray(a.magnitude[...], np.float32)
        paths = [p for p, _ in members]
        modules = _short_targets(paths, all_paths) or [hf[p] for p in paths]
        name = kind if len(groups) > 1 else "lora"
        out.append(PeftAdapter(name, _lora_config(r, scaling, kind == "dora", modules,
                                                  base_model_name_or_path), tensors))
    kron = [(p, a) for p, a in layers if isinstance(a, MoKA | MoKAs)]
    if kron:
        for name, factor, members in _lokr_groups(kron):
            tensors = {}
            for p, w1, w2 in members:
                tensors[f"{PREFIX}{hf[p]}.lokr_w1"] = w1.astype(np.float32)
                tensors[f"{PREFIX}{hf[p]}.lokr_w2"] = w2.astype(np.float32)
            r = max(max(w2.shape) for _, _, w2 in members)
            paths = [p for p, _, _ in members]
            modules = _short_targets(paths, all_paths) or [hf[p] for p in paths]
            out.append(PeftAdapter(name, _lokr_config(r, factor, modules,
                                                      base_model_name_or_path), tensors))
    return out


def export_peft(model, out_dir, base_model_name_or_path: str | None = None,
                overwrite: bool = False) -> Path:
    """Write the model's adapters as a PEFT directory (all checks before anything is written).

    One adapter: adapter_config.json + adapter_model.safetensors, for
    `PeftModel.from_pretrained(hf_base, out_dir)`. Several (MoKA with r > 1): the first at the
    top, the others in subdirectories named in peft_adapters.json; `load_peft_model` loads and
    activates them all. PEFT applies them to whatever base it is given: to reproduce a model
    trained on a 4-bit base, give it the dequantised base (export_hf(..., merged=False)).
    """
    from safetensors.numpy import save_file

    from moka_jax.models.hf import atomic_output_dir

    adapters = peft_adapters(model, base_model_name_or_path)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for i, a in enumerate(adapters):
            d = tmp if i == 0 else tmp / a.name
            d.mkdir(exist_ok=True)
            save_file({k: np.ascontiguousarray(v) for k, v in a.tensors.items()},
                      str(d / WEIGHTS_FILE), metadata={"format": "pt"})
            (d / CONFIG_FILE).write_text(json.dumps(a.config, indent=2))
        if len(adapters) > 1:
            index = {"adapters": [{"name": "default" if i == 0 else a.name,
                                   "subfolder": "" if i == 0 else a.name,
                                   "peft_type": a.config["peft_type"]}
                                  for i, a in enumerate(adapters)],
                     "note": "activate all together: PeftModel.base_model.set_adapter(names)"}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return Path(out_dir)


def load_peft_model(hf_model, peft_dir):
    """PeftModel over `hf_model` with every adapter of an export_peft directory active (torch)."""
    from peft import PeftModel

    peft_dir = Path(peft_dir)
    model = PeftModel.from_pretrained(hf_model, str(peft_dir))
    index = peft_dir / INDEX_FILE
    if index.is_file():
        entries = json.loads(index.read_text())["adapters"]
        for e in entries[1:]:
            model.load_adapter(str(peft_dir / e["subfolder"]), adapter_name=e["name"])
        # PeftModel.set_adapter takes one name; the tuner layer sums every active adapter.
        model.base_model.set_adapter([e["name"] for e in entries])
    return model.eval()


# ---- import ---------------------------------------------------------------------------------

# Keys of a PEFT LoraConfig that do not change what a trained adapter computes.
_INERT = {"peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision",
          "inference_mode", "auto_mapping", "init_lora_weights", "loftq_config", "eva_config",
          "corda_config", "lora_ga_config", "kasa_config", "megatron_config", "megatron_core",
          "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
          "lora_dropout", "ensure_weight_tying", "qalora_group_size", "alora_invocation_tokens",
          "r", "lora_alpha", "use_dora", "use_rslora", "bias"}
_SUFFIXES = {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b",
             ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude"}


def is_peft_dir(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_peft_config(peft_dir) -> dict:
    from moka_jax import files

    file = Path(peft_dir) / CONFIG_FILE
    try:
        cfg = files.read_json_object(file, "PEFT adapter config",
                                     "save the adapter again with PeftModel.save_pretrained")
    except files.FileCheckError as e:
        raise PeftError(str(e)) from None
    kind = cfg.get("peft_type")
    if kind != "LORA":
        raise PeftError(f"{file}: peft_type {kind!r}; moka-jax imports PEFT LoRA / DoRA "
                        "adapters (peft_type LORA) only")
    if cfg.get("bias", "none") != "none":
        raise PeftError(f"{file}: bias={cfg['bias']!r} trains base biases; moka-jax keeps the "
                        "base frozen (only bias='none' imports)")
    active = sorted(k for k, v in cfg.items() if k not in _INERT and v not in
                    (None, False, {}, [], "", 0))
    if active:
        raise PeftError(f"{file}: option(s) {', '.join(f'{k}={cfg[k]!r}' for k in active)} "
                        "change what the adapter computes and have no moka-jax counterpart")
    return cfg


def read_peft(peft_dir, llama_config) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter meta, {our tree key: array}) of a PEFT LoRA / DoRA directory.

    meta is what a moka-jax adapter records (adapter config, targets, base, tree), so the
    adapter attaches and loads like one of ours: to evaluate, or to train on.
    """
    from safetensors.numpy import load_file

    from moka_jax.adapters import DoRAConfig, LoRAConfig, adapter_config_to_dict
    from moka_jax.train.checkpoint import tree_signature

    peft_dir = Path(peft_dir)
    cfg = read_peft_config(peft_dir)
    file = peft_dir / WEIGHTS_FILE
    if not file.is_file():
        raise PeftError(f"{peft_dir}: no {WEIGHTS_FILE} (pickled adapter_model.bin files are "
                        "never loaded; re-save the adapter with safe_serialization=True)")
    from moka_jax import files
    try:  # named before safetensors reads it: truncated / random bytes
        files.safetensors_header(file, "save the adapter again with PeftModel.save_pretrained")
    except files.FileCheckError as e:
        raise PeftError(str(e)) from None
    raw = load_file(str(file))
    ours = {hf: path for path, hf in hf_module_map(llama_config).items()}
    values, shapes = {}, {}
    for key, arr in raw.items():
        module, leaf = next(((key[:-len(s)], v) for s, v in _SUFFIXES.items()
                             if key.endswith(s)), (None, None))
        module = module.removeprefix(PREFIX) if module else None
        if module is None or module not in ours:
            raise PeftError(f"{file}: tensor {key} is not a LoRA factor of a linear layer of "
                            f"this {llama_config.architecture} (e.g. "
                            f"{PREFIX}{next(iter(ours))}.lora_A.weight)")
        path = ours[module]
        values[f"{path}/adapter/{leaf}"] = np.asarray(arr, np.float32)
        shapes[path] = shapes.get(path, set()) | {leaf}
    dora = bool(cfg.get("use_dora"))
    want = {"lora_a", "lora_b"} | ({"magnitude"} if dora else set())
    for path, leaves in shapes.items():
        if leaves != want:
            raise PeftError(f"{file}: layer {path} has {sorted(leaves)}, expected "
                            f"{sorted(want)} for {'DoRA' if dora else 'LoRA'}")
    r = int(cfg["r"])
    for path in shapes:
        got = values[f"{path}/adapter/lora_a"].shape[0]
        if got != r:
            raise PeftError(f"{file}: layer {path} has rank {got}, the config r={r}")
    alpha = float(cfg.get("lora_alpha", 8))
    # rsLoRA scales by alpha / sqrt(r); ours is alpha / r, so alpha * sqrt(r) is the same dW.
    alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha
    adapter = (DoRAConfig if dora else LoRAConfig)(r=r, alpha=alpha)
    paths = sorted(shapes, key=list(ours.values()).index)
    targets = _short_targets(paths, list(ours.values())) or \
        "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    meta = {"format": "peft", "adapter": adapter_config_to_dict(adapter), "targets": targets,
            "base": {"path": cfg.get("base_model_name_or_path")},
            "tree": tree_signature(values), "source": str(peft_dir)}
    return meta, values
