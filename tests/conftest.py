import os

# Tests run on the CPU in f32; highest matmul precision keeps parity tolerances meaningful.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Tokenised-data and datasets caches in the session's temp dir, not the user's home."""
    if os.environ.get("MOKA_DATA_CACHE"):
        yield
        return
    os.environ["MOKA_DATA_CACHE"] = str(tmp_path_factory.mktemp("moka_data_cache"))
    yield
    os.environ.pop("MOKA_DATA_CACHE", None)


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny random LLaMA saved as a Hugging Face directory (one layer, dense)."""
    from flax import nnx

    from moka_jax.models.hf import save_hf
    from moka_jax.models.llama import Llama, LlamaConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return save_hf(Llama(cfg, quant="none", rngs=nnx.Rngs(0)), cfg,
                   tmp_path_factory.mktemp("m") / "hf")
