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
