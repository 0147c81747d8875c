"""Model definitions and checkpoint conversion (LLaMA, Hugging Face, GGUF)."""
