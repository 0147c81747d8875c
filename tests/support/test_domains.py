"""Value domains: one declaration per option, enforced by the config, the API and the CLIs alike.

The tests derive the bad values from the declarations themselves (just outside each bound),
so every option is covered, including ones added later.
"""

import argparse
import dataclasses
import math
import typing

import pytest

from moka_jax import config as C
from moka_jax.support import domains
from moka_jax.adapters import ADAPTER_CONFIGS

TRAIN_FILE = "data/commonsense_train/boolq/train.json"
CONFIG_CLASSES = [C.TinyModelConfig, C.ModelConfig, C.DataFile, C.DataConfig, C.TrainConfig,
                  C.DistributedConfig, C.MeshConfig]


def numeric(hint) -> bool:
    args = typing.get_args(hint) or (hint,)
    if typing.get_origin(hint) is list:
        return numeric(args[0])
    return any(a in (int, float) for a in args)


def outside(dom: domains.Domain, hint) -> list:
    """Values just outside a domain's bounds, of the option's own type."""
    integer = float not in (typing.get_args(hint) or (hint,)) and "float" not in str(hint)
    bad = []
    if math.isfinite(dom.lo):
        bad.append(dom.lo - 1 if dom.lo_closed else dom.lo)
    if math.isfinite(dom.hi):
        bad.append(dom.hi + 1 if dom.hi_closed else dom.hi)
    return [int(v) if integer else v for v in bad if v not in dom.extra]


def all_numeric_fields():
    for cls in [*CONFIG_CLASSES, *ADAPTER_CONFIGS.values()]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if numeric(hints[f.name]) and f.name != "shapes":
                yield cls, f, hints[f.name]


def test_parse_and_membership():
    d = domains.parse("[0, 1)")
    assert 0 in d and 0.5 in d and 1 not in d and -0.1 not in d and math.nan not in d
    assert 1 in domains.parse("(0, 1]") and 0 not in domains.parse("(0, 1]")
    assert 1 in domains.parse(">= 1") and 0 not in domains.parse(">= 1")
    assert math.inf not in domains.parse("> 0")  # lr = inf is no learning rate
    d = domains.parse("-1 or >= 1")
    assert -1 in d and 1 in d and 0 not in d and -2 not in d
    assert str(d) == "-1 or >= 1" and str(domains.parse("[0, 1)")) == "in [0, 1)"
    with pytest.raises(ValueError, match="domain"):
        domains.parse("between 0 and 1")


def test_check_names_option_value_and_domain():
    with pytest.raises(TypeError, match=r"top_p = '1' \(str\), expected float"):
        domains.check("top_p", "1", float, domains.TOP_P)
    with pytest.raises(ValueError, match=r"top_p = 2, expected in \(0, 1\]"):
        domains.check("top_p", 2, float, domains.TOP_P)
    with pytest.raises(TypeError, match="expected int"):
        domains.check("r", True, int, domains.COUNT)  # a bool is not a count
    assert domains.check("lr", 1, float, domains.POSITIVE) == 1  # an int is a float option
    with pytest.raises(ValueError, match=r"buckets\[1\] = 0"):
        domains.check("buckets", [64, 0], list[int], domains.COUNT)


@pytest.mark.parametrize("cls, f, hint", list(all_numeric_fields()),
                         ids=lambda x: getattr(x, "__name__", getattr(x, "name", "")))
def test_every_numeric_option_has_a_domain(cls, f, hint):
    # Seeds are >= 0 (numpy refuses negative seeds), so no numeric option is unbounded.
    assert domains.field_domain(f) is not None, f"{cls.__name__}.{f.name} declares no domain"
    assert f.default is dataclasses.MISSING or f.default is None \
        or domains.check(f.name, f.default, hint, domains.field_domain(f)) is not None


def _config_with(section: str, key: str, value) -> dict:
    d = {"model": {"path": "random", "tokenizer": "bytes"}, "data": {"train": [TRAIN_FILE]}}
    if section == "data.train[0]":
        d["data"]["train"] = [{"path": TRAIN_FILE, key: value}]
    elif section.startswith("adapter."):
        d["adapter"] = {"kind": section.split(".")[1], key: value}
    else:
        node = d
        for part in section.split("."):
            node = node.setdefault(part, {})
        node[key] = [value] if key == "buckets" else value
    return d


SECTION = {C.TinyModelConfig: "model.tiny", C.ModelConfig: "model", C.DataFile: "data.train[0]",
           C.DataConfig: "data", C.TrainConfig: "train", C.DistributedConfig: "mesh.distributed",
           C.MeshConfig: "mesh", **{c: f"adapter.{k}" for k, c in ADAPTER_CONFIGS.items()}}


def bad_cases():
    for cls, f, hint in all_numeric_fields():
        for v in outside(domains.field_domain(f), hint):
            yield pytest.param(cls, f.name, v, id=f"{cls.__name__}.{f.name}={v}")


@pytest.mark.parametrize("cls, name, value", list(bad_cases()))
def test_config_refuses_every_value_outside_its_domain(cls, name, value):
    section = SECTION[cls]
    with pytest.raises(C.ConfigError) as e:
        C.config_from_dict(_config_with(section, name, value))
    key = "adapter" if section.startswith("adapter.") else section
    assert f"{key}.{name}" in str(e.value) and "expected" in str(e.value), str(e.value)


@pytest.mark.parametrize("cls, name, value", [c for c in bad_cases()
                                              if c.values[0] in ADAPTER_CONFIGS.values()])
def test_public_adapter_configs_refuse_the_same_values(cls, name, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name} = "):
        cls(**{name: value})


def test_public_api_type_errors():
    import moka_jax as mj
    with pytest.raises(TypeError, match=r"MoKAConfig.r = '4' \(str\), expected int"):
        mj.MoKAConfig(r="4")
    with pytest.raises(TypeError, match=r"LoRAConfig.alpha = None"):
        mj.LoRAConfig(alpha=None)
    with pytest.raises(ValueError, match=r"plan_moka_shapes: m \(out features\) = -4, expected >= 1"):
        mj.plan_moka_shapes(-4, 64, 2)
    with pytest.raises(TypeError, match=r"plan_mokas_primes: r = '2'"):
        mj.plan_mokas_primes(64, 64, "2")
    with pytest.raises(ValueError, match=r"budget = 0"):
        mj.plan_moka_shapes(64, 64, 2, 0)


def test_argparse_type_exits_2_naming_the_option(capsys):
    ap = argparse.ArgumentParser(prog="x")
    ap.add_argument("--top-p", type=domains.arg(float, domains.TOP_P), default=1.0)
    for bad, msg in (("2", r"argument --top-p: 2, expected in (0, 1]"),
                     ("abc", "argument --top-p: 'abc' is not a valid float")):
        with pytest.raises(SystemExit) as e:
            ap.parse_args(["--top-p", bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert ap.parse_args(["--top-p", "0.9"]).top_p == 0.9


@pytest.mark.parametrize("argv, option", [
    (["--limit", "-3"], "--limit"), (["--shots", "-1"], "--shots"),
    (["--batch-size", "0"], "--batch-size"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--beams", "0"], "--beams"), (["--cutoff-len", "0"], "--cutoff-len"),
    (["--seed", "-1"], "--seed"),
])
def test_eval_cli_options_have_domains(argv, option, capsys):
    import eval as eval_cli
    with pytest.raises(SystemExit) as e:
        eval_cli.parse_args(argv)
    assert e.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["--temperature", "-1"], "--temperature"), (["--top-p", "2"], "--top-p"),
    (["--top-p", "0"], "--top-p"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--beams", "0"], "--beams"), (["--seed", "-1"], "--seed"),
])
def test_generate_cli_options_have_domains(argv, option, capsys):
    from moka_jax.cli import generate
    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt", "hi", *argv])
    assert e.value.code == 2 and f"argument {option}:" in capsys.readouterr().err


def test_convert_cli_block_size(capsys):
    from moka_jax.cli import convert
    with pytest.raises(SystemExit) as e:
        convert.main(["src", "dst", "--block-size", "0"])
    assert e.value.code == 2 and "argument --block-size: 0, expected >= 1" in capsys.readouterr().err


def test_generate_function_checks_its_arguments():
    from moka_jax.eval.generate import beam_search, generate
    for kw, msg in (({"max_new_tokens": 0}, "max_new_tokens = 0"),
                    ({"temperature": -1.0}, "temperature = -1.0"),
                    ({"top_p": 2.0}, r"top_p = 2.0, expected in \(0, 1\]")):
        with pytest.raises(ValueError, match=msg):
            generate(None, [[1, 2]], **kw)  # refused before the model is touched
    with pytest.raises(ValueError, match="num_beams = 0"):
        beam_search(None, [[1, 2]], num_beams=0)
