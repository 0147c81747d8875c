"""moka_jax/__init__.py: every public name, imported lazily (no JAX until a name needs it)."""

import subprocess
import sys

import moka_jax as mj

PUBLIC = {
    "AdapterParam", "DEFAULT_TARGETS", "DoRAConfig", "FrozenWeight", "Linear", "LoRAConfig",
    "MoKAConfig", "MoKADense", "MoKAsConfig", "QuantizedWeight", "adapter_config_from_dict",
    "adapter_config_to_dict", "adapter_state", "attach_adapters", "count_params", "dequantize",
    "kron_apply", "kron_materialize", "load", "merge", "plan_moka_shapes", "plan_mokas_primes",
    "quantize", "save_adapter", "summary", "Config", "load_config", "train",
    "kron_svd_fit", "lora_svd_fit", "moka_from_delta",
}


def test_every_public_name_resolves():
    assert set(mj.__all__) == PUBLIC
    assert PUBLIC <= set(dir(mj))
    for name in PUBLIC:
        assert getattr(mj, name) is not None, name
    assert callable(mj.train) and mj.train.__module__ == "moka_jax.training.run"


def test_train_stays_the_function_after_the_training_package_is_imported():
    import moka_jax.training.loop  # noqa: F401
    import moka_jax.training.run  # noqa: F401
    assert callable(mj.train) and not hasattr(mj.train, "__path__")


def test_unknown_name_is_an_attribute_error():
    try:
        mj.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("no AttributeError")


def test_import_moka_jax_imports_no_jax():
    code = ("import sys, moka_jax, moka_jax.support.machine, moka_jax.parity; "
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m); "
            "moka_jax.MoKAConfig; print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # a name that needs JAX imports it on first use
