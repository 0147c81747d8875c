"""Where a base model comes from: the one resolver of a model name or directory.

    src = resolve("smollm2")     # the embedded SmolLM2-135M-Instruct, converted once to a cache
    src = resolve("random")      # the random tiny model (models.presets.tiny)
    src = resolve("path/to/dir") # a Hugging Face directory, or a moka_jax convert directory
    src.kind, src.path           # "hf" | "converted" | "random", the directory (None: random)

Every caller (training, evaluation, generation, export, conversion, benches) names its base
through here, so "smollm2 or a directory" means the same everywhere.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

KEYWORDS = ("smollm2", "random")    # model names that are not directories
CONVERTED_MARKER = "moka_convert.json"  # written by models.convert.save_converted
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    spec: str               # as the caller gave it
    kind: str               # "hf" | "converted" | "random"
    path: Path | None       # the directory; None for "random"

    @property
    def has_tokenizer(self) -> bool:
        return self.path is not None and has_tokenizer(self.path)


def is_converted(path) -> bool:
    """A `moka_jax.cli.convert` output directory (its own quantisation, orbax weights)."""
    return (Path(path) / CONVERTED_MARKER).is_file()


def has_tokenizer(path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def resolve(spec) -> ModelSource:
    """The source `spec` names; support.files.FileCheckError (a ValueError naming the path)
    when it is none of KEYWORDS, a Hugging Face directory (with config.json) or a converted
    directory."""
    name = str(spec)
    if name == "random":
        return ModelSource(name, "random", None)
    if name == "smollm2":
        from moka_jax.models.gguf import ensure_smollm2
        return ModelSource(name, "hf", ensure_smollm2())
    path = Path(spec).expanduser()
    if is_converted(path):
        return ModelSource(name, "converted", path)
    if (path / "config.json").is_file():
        return ModelSource(name, "hf", path)
    from moka_jax.support.files import FileCheckError
    raise FileCheckError(path, "no config.json: not a Hugging Face model directory",
                         f"give one, a `moka-convert` directory or one of {list(KEYWORDS)}")


def resolve_dir(spec) -> Path | None:
    """resolve(spec).path: the directory of the base (None for "random")."""
    return resolve(spec).path


__all__ = ["CONVERTED_MARKER", "KEYWORDS", "ModelSource", "has_tokenizer", "is_converted",
           "resolve", "resolve_dir"]
