"""Model definitions and checkpoint conversion (the LLaMA family: LLaMA, Mistral, Qwen2,
Qwen3; Hugging Face, GGUF)."""

from moka_jax.models.cache import KVCache
from moka_jax.models.hf import CheckpointError, load_hf, save_hf
from moka_jax.models.llama import Llama, LlamaConfig
