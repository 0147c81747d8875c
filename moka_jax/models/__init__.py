"""Model definitions and checkpoint conversion (LLaMA, Hugging Face, GGUF)."""

from moka_jax.models.cache import KVCache
from moka_jax.models.hf import CheckpointError, load_hf, save_hf
from moka_jax.models.llama import Llama, LlamaConfig
