"""Hugging Face <-> JAX: the key map, a streaming (quantise-as-you-read) loader, and export.

    model, config = load_hf("path/to/hf_dir", quant="nf4")
    save_hf(model, config, "out_dir", tokenizer_dir="path/to/hf_dir")   # transformers loads it

Only safetensors are read (never pickles), and the raw bytes are read tensor by tensor, so
bf16 checkpoints need no torch and peak host memory stays near the quantised model size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from moka_jax.support import files as fio
from moka_jax.support import outputs
from moka_jax.support.hostmem import aligned_empty, host_cast, to_device
from moka_jax.support.finite import check_finite
from moka_jax.models.llama import Llama, LlamaConfig, check_tokenizer_vocab
from moka_jax.models.source import CONVERTED_MARKER
from moka_jax.nn import Linear

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "added_tokens.json", "vocab.json",
                   "merges.txt", "generation_config.json")
# Checkpoint entries that carry no weights of ours (recomputed or tied).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F64": np.float64}


class CheckpointError(fio.FileCheckError):
    """A checkpoint directory that cannot be loaded; the message names the file and tensor."""


_REFETCH = ("re-download or re-export the model (a copy interrupted mid-write is the usual "
            "cause)")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str  # e.g. model.layers.0.self_attn.q_proj.weight
    path: str  # module path of a Linear ("linear" / "bias") or of a FrozenWeight ("frozen")
    kind: str  # "linear" | "bias" | "frozen"
    shape: tuple  # HF layout, (out, in) for linear weights


def hf_tensor_specs(c: LlamaConfig) -> list[TensorSpec]:
    """Every tensor of a HF checkpoint of the decoder family and where it lives in `Llama`."""
    d, f, h = c.hidden_size, c.intermediate_size, c.head_dim
    qo, kv = c.num_attention_heads * h, c.num_key_value_heads * h
    specs = [TensorSpec("model.embed_tokens.weight", "embed/embedding", "frozen", (c.vocab_size, d))]
    for i in range(c.num_hidden_layers):
        p, hp = f"layers/{i}", f"model.layers.{i}"
        specs += [TensorSpec(f"{hp}.input_layernorm.weight", f"{p}/attn_norm/weight", "frozen", (d,)),
                  TensorSpec(f"{hp}.post_attention_layernorm.weight", f"{p}/mlp_norm/weight",
                             "frozen", (d,))]
        qkv = c.biased_qkv
        for name, out, inp, bias in (("q_proj", qo, d, qkv), ("k_proj", kv, d, qkv),
                                     ("v_proj", kv, d, qkv), ("o_proj", d, qo, c.attention_bias)):
            specs.append(TensorSpec(f"{hp}.self_attn.{name}.weight", f"{p}/attn/{name}", "linear",
                                    (out, inp)))
            if bias:
                specs.append(TensorSpec(f"{hp}.self_attn.{name}.bias", f"{p}/attn/{name}", "bias",
                                        (out,)))
        if c.qk_norm:
            specs += [TensorSpec(f"{hp}.self_attn.{n}_norm.weight", f"{p}/attn/{n}_norm/weight",
                                 "frozen", (h,)) for n in "qk"]
        for name, out, inp in (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)):
            specs.append(TensorSpec(f"{hp}.mlp.{name}.weight", f"{p}/mlp/{name}", "linear", (out, inp)))
            if c.mlp_bias:
                specs.append(TensorSpec(f"{hp}.mlp.{name}.bias", f"{p}/mlp/{name}", "bias", (out,)))
    specs.append(TensorSpec("model.norm.weight", "norm/weight", "frozen", (d,)))
    if not c.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", "lm_head", "linear", (c.vocab_size, d)))
    return specs


# ---- safetensors, read and written as raw bytes ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple
    offset: int  # absolute byte offset in the file
    nbytes: int


def _read_header(file: Path) -> dict[str, _Entry]:
    """The tensor index of one safetensors file, checked against the file's size."""
    try:
        header, _, start = fio.safetensors_header(file, fix=_REFETCH)
    except fio.FileCheckError as e:
        raise CheckpointError(str(e)) from None
    return {name: _Entry(file, e["dtype"], tuple(e["shape"]), start + e["data_offsets"][0],
                         e["data_offsets"][1] - e["data_offsets"][0]) for name, e in header.items()}


def _read_tensor(name: str, e: _Entry) -> np.ndarray:
    """One tensor in its stored dtype (bf16 as ml_dtypes.bfloat16), read straight from the file."""
    if e.dtype not in _ST_DTYPES:
        raise CheckpointError(f"{e.file}: tensor {name} has dtype {e.dtype}; expected a float "
                              f"dtype ({', '.join(_ST_DTYPES)})")
    dt = np.dtype(_ST_DTYPES[e.dtype])
    # Read into an aligned buffer: jax.device_put then aliases it instead of copying it (hostmem).
    raw, got = aligned_empty((e.nbytes,), np.uint8), 0
    with open(e.file, "rb", buffering=0) as fh:
        fh.seek(e.offset)
        view = memoryview(raw)
        while got < e.nbytes:
            n = fh.readinto(view[got:])
            if not n:
                break
            got += n
    if got != e.nbytes:  # the header was checked against the size; the file shrank since
        raise CheckpointError(e.file, f"tensor {name} is cut short ({got} of {e.nbytes} "
                              "bytes): the file is truncated", _REFETCH)
    # checked as it streams: a NaN / inf weight never reaches a model
    return check_finite(raw.view(dt).reshape(e.shape), f"{e.file}: tensor {name}", _REFETCH)


def _st_dtype_name(dtype) -> str:
    return {np.dtype(v): k for k, v in _ST_DTYPES.items()}[np.dtype(dtype)]


def write_safetensors(file: Path, tensors: list[tuple[str, tuple, np.dtype, callable]]):
    """Write (name, shape, dtype, get_array) one tensor at a time; arrays are built lazily."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in tensors:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _st_dtype_name(dtype), "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
    with open(file, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little") + blob)
        for name, shape, dtype, get in tensors:
            arr = np.ascontiguousarray(np.asarray(get()).astype(dtype))
            if arr.shape != tuple(shape):
                raise ValueError(f"{file}: tensor {name} has shape {arr.shape}, expected {shape}")
            fh.write(arr.tobytes())


# ---- loading --------------------------------------------------------------------------------

def read_config(path) -> LlamaConfig:
    """config.json of a HF directory, checked for a supported architecture (models.families)
    and for every key it sets, before any tensor is read."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a Hugging Face model directory needs config.json")
    try:
        d = fio.read_json_object(file, "model config", fix=_REFETCH)
    except fio.FileCheckError as e:
        raise CheckpointError(str(e)) from None
    try:
        return LlamaConfig.from_hf_dict(d)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{file}: {e!s}") from None


def checkpoint_index(path) -> dict[str, _Entry]:
    """name -> where its bytes are, for a single-file or sharded (index.json) checkpoint."""
    path = Path(path)
    if (path / CONVERTED_MARKER).is_file():
        source = fio.read_json_object(path / CONVERTED_MARKER).get("source")
        raise CheckpointError(
            f"{path}: a `moka-convert` directory (pre-quantised orbax, not Hugging "
            "Face safetensors); `moka-generate --model` loads it, training and "
            "eval.py need the Hugging Face directory it was converted from"
            + (f" ({source})" if source else ""))
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            index = fio.read_json_object(index_file, "shard index", fix=_REFETCH)
        except fio.FileCheckError as e:
            raise CheckpointError(str(e)) from None
        weight_map = index.get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index_file}: lists shard {f.name}, which is missing")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" (found {', '.join(pickles)}: pickled checkpoints are never loaded; convert "
                "them to safetensors first)") if pickles else ""
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
    entries: dict[str, _Entry] = {}
    for f in files:
        for name, e in _read_header(f).items():
            if name in entries:
                raise CheckpointError(f"{f}: tensor {name} also appears in {entries[name].file}")
            entries[name] = e
    return entries


def check_checkpoint(config: LlamaConfig, entries: dict[str, _Entry], path) -> list[TensorSpec]:
    """Missing / extra tensors and shape disagreements, before any heavy work."""
    specs = hf_tensor_specs(config)
    files = sorted({e.file.name for e in entries.values()})
    for s in specs:
        e = entries.get(s.hf_name)
        if e is None:
            raise CheckpointError(f"{path}: tensor {s.hf_name} is missing (searched "
                                  f"{', '.join(files)})")
        if e.shape != s.shape:
            raise CheckpointError(f"{e.file}: tensor {s.hf_name} has shape {e.shape}, but "
                                  f"{Path(path) / 'config.json'} implies {s.shape}")
    known = {s.hf_name for s in specs}
    if config.tie_word_embeddings:
        known.add("lm_head.weight")  # some tied checkpoints also store the head
    extra = sorted(n for n in entries if n not in known and not n.endswith(_IGNORED_SUFFIXES))
    if extra:
        raise CheckpointError(f"{entries[extra[0]].file}: tensor(s) {', '.join(extra[:5])} are not "
                              f"part of a {config.architecture} with this config.json")
    return specs


def check_tokenizer(path, config: LlamaConfig):
    """A tokenizer with more tokens than embedding rows would index past the table."""
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        return
    from tokenizers import Tokenizer

    fix = "copy a good tokenizer.json from the model's original repository"
    fio.read_json_object(file, "tokenizer file", fix)
    try:
        n = Tokenizer.from_file(str(file)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # the tokenizers library's errors do not name the file
        raise CheckpointError(file, f"not a tokenizer the `tokenizers` library reads ({e})",
                              fix) from None
    try:
        check_tokenizer_vocab(config, n, file.name)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None


def default_dtype():
    """bf16 on accelerators; f32 on CPU, where bf16 matmuls are slow and parity is checked."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def node_at(model, path: str):
    """The module or variable at 'layers/0/attn/q_proj' (the paths adapter regexes match)."""
    node = model
    for part in filter(None, path.split("/")):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def _replace(model, path: str, value):
    parent_path, name = path.rsplit("/", 1) if "/" in path else ("", path)
    parent = node_at(model, parent_path) if parent_path else model
    if name.isdigit():
        parent[int(name)] = value
    else:
        setattr(parent, name, value)


def _place(tree, prefix: str, sharding):
    """device_put each leaf to sharding(path), path like 'layers/0/attn/q_proj/kernel/packed'."""
    def put(kp, leaf):
        keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in kp]
        target = None if sharding is None else sharding("/".join([prefix, *keys]))
        return to_device(leaf) if target is None else jax.device_put(leaf, target)

    return jax.tree_util.tree_map_with_path(put, tree)


def load_hf(path, quant: str = "nf4", *, dtype=None, block_size: int = 64,
            double_quant: bool = False, symmetric: bool = True, sharding=None,
            remat: bool = False, progress: bool = False) -> tuple[Llama, LlamaConfig]:
    """Load a HF LLaMA directory, quantising each frozen linear as it streams in.

    The model skeleton is built abstractly (nnx.eval_shape, no random weights); each tensor is
    then read from disk, quantised (q/k/v/o and MLP projections) or cast to `dtype`
    (embeddings, norms, lm_head), placed, and dropped before the next one is read.
    sharding: None, or a callable path -> jax.sharding.Sharding | None, called per array leaf.
    """
    path = Path(path)
    dtype = dtype or default_dtype()
    config = read_config(path)
    entries = checkpoint_index(path)
    specs = check_checkpoint(config, entries, path)
    check_tokenizer(path, config)
    model = nnx.eval_shape(lambda: Llama(config, dtype=dtype, param_dtype=dtype, quant="none",
                                         remat=remat, rngs=nnx.Rngs(0)))
    biases = {s.path: s.hf_name for s in specs if s.kind == "bias"}
    # Float tensors (embeddings, lm_head) first: their transient copies then coincide with a
    # nearly empty model instead of adding to the full 4-bit one at the end (peak RSS).
    todo = sorted((s for s in specs if s.kind != "bias"),
                  key=lambda s: s.kind == "linear" and s.path != "lm_head")
    if progress:
        from tqdm import tqdm
        todo = tqdm(todo, desc=f"load {path.name} ({quant})", unit="tensor")
    for s in todo:
        arr = _read_tensor(s.hf_name, entries[s.hf_name])
        if s.kind == "frozen":  # cast on the host, then straight to its device(s)
            host = host_cast(arr, jax.dtypes.canonicalize_dtype(dtype))
            del arr
            node_at(model, s.path).set_value(_place(host, s.path, sharding))
            continue
        bias = biases.get(s.path)
        bias = None if bias is None else _read_tensor(bias, entries[bias]).astype(np.float32)
        # quantize() reads bf16 / f16 as stored (no f32 copy of the tensor).
        layer = Linear.from_weight(arr, bias, quant="none" if s.path == "lm_head" else quant,
                                   block_size=block_size, double_quant=double_quant,
                                   symmetric=symmetric, dtype=dtype, param_dtype=dtype,
                                   name=s.path)
        del arr
        if sharding is not None:
            for name in ("kernel", "bias"):
                var = getattr(layer, name)
                if var is not None:
                    var.set_value(_place(var.get_value(), f"{s.path}/{name}", sharding))
        _replace(model, s.path, layer)
    return model, config


# ---- export ----------------------------------------------------------------------------------

def atomic_output_dir(out_dir, overwrite: bool = False, *, command: str = "save_hf", inputs=()):
    """outputs.atomic_output_dir: the one safe-output check, then an atomic rename."""
    return outputs.atomic_output_dir(out_dir, overwrite, command=command, inputs=inputs)


def copy_tokenizer_files(src, dst) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def _tensor_getter(model, spec: TensorSpec, merged: bool):
    """The tensor's values, checked finite (an adapter's NaN would become a merged weight's)."""
    get = _raw_getter(model, spec, merged)
    adapted = merged and getattr(node_at(model, spec.path), "adapter", None) is not None
    what = f"{spec.hf_name} ({'merged weight' if adapted else 'weight'})"
    return lambda: check_finite(get(), what, "nothing was written; check the adapter and base")


def _raw_getter(model, spec: TensorSpec, merged: bool):
    node = node_at(model, spec.path)
    if spec.kind == "frozen":
        return lambda: np.asarray(node.get_value().astype(jnp.float32))
    if spec.kind == "bias":
        return lambda: np.asarray(node.bias.get_value().astype(jnp.float32))
    # Merge semantics belong to the adapter (Linear.merged_weight -> adapter.merge(w0)).
    return lambda: np.asarray(node.merged_weight(jnp.float32) if merged else node.weight(jnp.float32))


def save_hf(model: Llama, config: LlamaConfig, out_dir, *, tokenizer_dir=None, merged: bool = True,
            dtype=np.float32, max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False,
            command: str = "save_hf", inputs=()) -> Path:
    """Write a HF directory transformers loads unchanged (LlamaForCausalLM.from_pretrained).

    merged: Linears with an adapter are written as dequantised base + dW; with merged=False
    only the (dequantised) base is written. dtype: np.float32 or ml_dtypes.bfloat16.
    Tensors are materialised one at a time, so export of a 4-bit model stays small on the host.
    """
    dtype = np.dtype(dtype)
    specs = hf_tensor_specs(config)
    shards, size = [[]], 0
    for s in specs:
        nbytes = int(np.prod(s.shape)) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    with atomic_output_dir(out_dir, overwrite, command=command,
                           inputs=[tokenizer_dir, *inputs]) as tmp:
        n = len(shards)
        names = (["model.safetensors"] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map = {}
        for name, shard in zip(names, shards):
            write_safetensors(tmp / name, [(s.hf_name, s.shape, dtype,
                                             _tensor_getter(model, s, merged)) for s in shard])
            weight_map.update({s.hf_name: name for s in shard})
        if n > 1:
            total = sum(int(np.prod(s.shape)) * dtype.itemsize for s in specs)
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = config.to_hf_dict()
        hf["dtype"] = "bfloat16" if dtype == np.dtype(ml_dtypes.bfloat16) else "float32"
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)
    return Path(out_dir)
