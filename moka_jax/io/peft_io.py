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
In: a PEFT LoRA directory (LoRA, DoRA, rsLoRA) over a LLaMA-family base becomes our LoRA / DoRA;
a PEFT LoKr directory (whole or low-rank factors; several LoKr adapters as export_peft writes
them) becomes an ungated MoKA with one component per LoKr adapter and its shapes per weight
dims. Options that would change what the adapter computes and that moka-jax does not model
are refused, by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from moka_jax.core import shapes as shapes_lib
from moka_jax.adapters import DoRA, LoRA, MoKA, MoKAs
from moka_jax.models.hf import hf_tensor_specs
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
                overwrite: bool = False, *, command: str = "save_peft") -> Path:
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
    with atomic_output_dir(out_dir, overwrite, command=command) as tmp:
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

# Keys of a PEFT config that do not change what a trained adapter computes (per peft_type).
_COMMON_INERT = {"peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision",
                 "inference_mode", "auto_mapping", "target_modules", "exclude_modules",
                 "layers_to_transform", "layers_pattern", "r", "bias"}
_INERT = {
    "LORA": _COMMON_INERT | {
        "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
        "kasa_config", "megatron_config", "megatron_core", "lora_dropout", "ensure_weight_tying",
        "qalora_group_size", "alora_invocation_tokens", "lora_alpha", "use_dora", "use_rslora"},
    # dropouts act in training only; decompose_* decide the factor shapes, read off the tensors
    "LOKR": _COMMON_INERT | {
        "alpha", "init_weights", "rank_dropout", "module_dropout", "rank_dropout_scale",
        "decompose_both", "decompose_factor", "use_effective_conv2d"},
}
_SUFFIXES = {
    "LORA": {".lora_A.weight": "lora_a", ".lora_B.weight": "lora_b",
             ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude"},
    "LOKR": {f".lokr_{k}": k for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")},
}


def is_peft_dir(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_peft_config(peft_dir) -> dict:
    from moka_jax.support import files

    file = Path(peft_dir) / CONFIG_FILE
    try:
        cfg = files.read_json_object(file, "PEFT adapter config",
                                     "save the adapter again with PeftModel.save_pretrained")
    except files.FileCheckError as e:
        raise PeftError(str(e)) from None
    kind = cfg.get("peft_type")
    if kind not in _INERT:
        raise PeftError(f"{file}: peft_type {kind!r}; moka-jax imports PEFT LoRA / DoRA "
                        "(peft_type LORA) and LoKr (LOKR) adapters")
    if cfg.get("bias", "none") != "none":
        raise PeftError(f"{file}: bias={cfg['bias']!r} trains base biases; moka-jax keeps the "
                        "base frozen (only bias='none' imports)")
    active = sorted(k for k, v in cfg.items() if k not in _INERT[kind] and v not in
                    (None, False, {}, [], "", 0))
    if active:
        raise PeftError(f"{file}: option(s) {', '.join(f'{k}={cfg[k]!r}' for k in active)} "
                        "change what the adapter computes and have no moka-jax counterpart")
    return cfg


def _adapter_dirs(peft_dir: Path) -> list[Path]:
    """The directory's adapters: itself, plus the others export_peft lists in its index."""
    index = peft_dir / INDEX_FILE
    if not index.is_file():
        return [peft_dir]
    entries = json.loads(index.read_text())["adapters"]
    return [peft_dir] + [peft_dir / e["subfolder"] for e in entries[1:]]


def _read_layers(adapter_dir: Path, kind: str, ours: dict, llama_config) -> dict[str, dict]:
    """{our layer path: {leaf: array}} of one PEFT adapter's safetensors."""
    from safetensors.numpy import load_file

    from moka_jax.support import files

    file = adapter_dir / WEIGHTS_FILE
    if not file.is_file():
        raise PeftError(f"{adapter_dir}: no {WEIGHTS_FILE} (pickled adapter_model.bin files are "
                        "never loaded; re-save the adapter with safe_serialization=True)")
    try:  # named before safetensors reads it: truncated / random bytes
        files.safetensors_header(file, "save the adapter again with PeftModel.save_pretrained")
    except files.FileCheckError as e:
        raise PeftError(str(e)) from None
    layers: dict[str, dict] = {}
    example = next(iter(_SUFFIXES[kind]))
    for key, arr in load_file(str(file)).items():
        module, leaf = next(((key[:-len(sfx)], v) for sfx, v in _SUFFIXES[kind].items()
                             if key.endswith(sfx)), (None, None))
        module = module.removeprefix(PREFIX) if module else None
        if module is None or module not in ours:
            factor = "LoRA" if kind == "LORA" else "LoKr"
            raise PeftError(f"{file}: tensor {key} is not a {factor} factor of a linear layer "
                            f"of this {llama_config.architecture} (e.g. "
                            f"{PREFIX}{next(iter(ours))}{example})")
        layers.setdefault(ours[module], {})[leaf] = np.asarray(arr, np.float32)
    return layers


def _targets(paths: list[str], ours: dict) -> list[str] | str:
    return _short_targets(paths, list(ours.values())) or \
        "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def read_peft(peft_dir, llama_config) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter meta, {our tree key: array}) of a PEFT LoRA / DoRA / LoKr directory.

    meta is what a moka-jax adapter records (adapter config, targets, base, tree), so the
    adapter attaches and loads like one of ours: to evaluate, or to train on.
    """
    from moka_jax.adapters import adapter_config_to_dict
    from moka_jax.support.trees import tree_signature

    peft_dir = Path(peft_dir)
    dirs = _adapter_dirs(peft_dir)
    cfgs = [read_peft_config(d) for d in dirs]
    kinds = {c["peft_type"] for c in cfgs}
    if len(kinds) > 1:
        raise PeftError(f"{peft_dir}: adapters of types {sorted(kinds)} together; import one type")
    ours = {hf: path for path, hf in hf_module_map(llama_config).items()}
    read = [_read_layers(d, c["peft_type"], ours, llama_config) for d, c in zip(dirs, cfgs)]
    if kinds == {"LORA"}:
        if len(dirs) > 1:
            raise PeftError(f"{peft_dir}: {len(dirs)} LoRA adapters; merge them into one in "
                            "PEFT (add_weighted_adapter) before importing")
        adapter, values = _lora(cfgs[0], read[0], peft_dir / WEIGHTS_FILE)
    else:
        dims = {sp.path: sp.shape for sp in hf_tensor_specs(llama_config) if sp.kind == "linear"}
        adapter, values = _lokr(cfgs, read, dirs, dims)
    paths = sorted({k.split("/adapter/")[0] for k in values}, key=list(ours.values()).index)
    meta = {"format": "peft", "adapter": adapter_config_to_dict(adapter),
            "targets": _targets(paths, ours), "base": {"path": cfgs[0].get("base_model_name_or_path")},
            "tree": tree_signature(values), "source": str(peft_dir)}
    return meta, values


def _lora(cfg: dict, layers: dict, file: Path):
    from moka_jax.adapters import DoRAConfig, LoRAConfig

    dora = bool(cfg.get("use_dora"))
    want = {"lora_a", "lora_b"} | ({"magnitude"} if dora else set())
    r = int(cfg["r"])
    for path, leaves in layers.items():
        if set(leaves) != want:
            raise PeftError(f"{file}: layer {path} has {sorted(leaves)}, expected "
                            f"{sorted(want)} for {'DoRA' if dora else 'LoRA'}")
        if leaves["lora_a"].shape[0] != r:
            raise PeftError(f"{file}: layer {path} has rank {leaves['lora_a'].shape[0]}, the "
                            f"config r={r}")
    alpha = float(cfg.get("lora_alpha", 8))
    # rsLoRA scales by alpha / sqrt(r); ours is alpha / r, so alpha * sqrt(r) is the same dW.
    alpha = alpha * math.sqrt(r) if cfg.get("use_rslora") else alpha
    values = {f"{path}/adapter/{leaf}": v for path, leaves in layers.items()
              for leaf, v in leaves.items()}
    return (DoRAConfig if dora else LoRAConfig)(r=r, alpha=alpha), values


def _lokr_factor(leaves: dict, w: str, where: str) -> np.ndarray:
    """A LoKr factor: stored whole (w1), or as its low-rank product (w1_a @ w1_b)."""
    if w in leaves:
        return np.asarray(leaves[w], np.float64)
    if f"{w}_a" in leaves and f"{w}_b" in leaves:
        return np.asarray(leaves[f"{w}_a"], np.float64) @ np.asarray(leaves[f"{w}_b"], np.float64)
    raise PeftError(f"{where}: no lokr_{w} (or lokr_{w}_a and lokr_{w}_b); got "
                    f"{sorted(leaves)}")


def _lokr(cfgs: list[dict], read: list[dict], dirs: list[Path], dims: dict):
    """Ungated MoKA with one component per LoKr adapter of a layer: A_i = r_l (alpha_i / r_i)
    w1_i, B_i = w2_i, scale 1, so dW = sum_i (alpha_i / r_i) kron(w1_i, w2_i), PEFT's sum of
    active adapters, exactly (the ungated mixture's 1 / r_l is folded into A). Low-rank
    (decomposed) factors come in as their products: exact in the forward pass, and continued
    training trains the full factors. Shapes are recorded per weight dims (MoKAConfig.shapes)."""
    from moka_jax.adapters import MoKAConfig
    from moka_jax.adapters.moka import component_groups

    comps: dict[str, list] = {}
    for cfg, layers, d in zip(cfgs, read, dirs):
        scaling = float(cfg.get("alpha", 8)) / float(cfg["r"])
        for path, leaves in layers.items():
            where = f"{d / WEIGHTS_FILE}: layer {path}"
            if "t2" in leaves:
                raise PeftError(f"{where} has lokr_t2 (a conv CP factor); linear layers have none")
            w1, w2 = _lokr_factor(leaves, "w1", where), _lokr_factor(leaves, "w2", where)
            m, n = dims[path]
            if w1.shape[0] * w2.shape[0] != m or w1.shape[1] * w2.shape[1] != n:
                raise PeftError(f"{where}: kron of w1 {w1.shape} and w2 {w2.shape} is not the "
                                f"{m}x{n} weight")
            comps.setdefault(path, []).append((scaling * w1, w2))
    table, values = {}, {}
    for path, pairs in comps.items():
        shapes = [(a.shape, b.shape) for a, b in pairs]
        key = "{}x{}".format(*dims[path])
        if table.setdefault(key, shapes) != shapes:
            raise PeftError(f"{dirs[0]}: layers of the {key} weight differ in their LoKr "
                            f"factors ({table[key]} vs {shapes} at {path}); moka-jax keeps one "
                            "list of shapes per weight dims")
        for g, ids in enumerate(component_groups(shapes).values()):
            values[f"{path}/adapter/a/{g}"] = np.stack(
                [len(pairs) * pairs[i][0] for i in ids]).astype(np.float32)
            values[f"{path}/adapter/b/{g}"] = np.stack([pairs[i][1] for i in ids]).astype(np.float32)
    return MoKAConfig(r=max(len(v) for v in table.values()), shapes=table, scale=1.0,
                      gated=False), values
