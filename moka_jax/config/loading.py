"""YAML files with `inherit:`, `--set a.b=v` overrides, and the argparse / dump helpers."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import yaml

from moka_jax.config.build import config_from_dict
from moka_jax.config.checks import _check_data_files
from moka_jax.config.schema import Config
from moka_jax.config.sources import ConfigError, _Sources


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` (no dot) as a float, as YAML 1.2 does, and refuses a
    key given twice in one mapping (PyYAML would keep the second silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKey(key, first[key], line)
                first[key] = line
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first} and {second}); "
                         "YAML would keep only the second: keep one")


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_value(text: str):
    """An override value as YAML: `1e-4` -> float, `[64, 128]` -> list, `null` -> None."""
    return yaml.load(text, Loader=_Loader) if text.strip() else None


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    try:
        d = yaml.load(text, Loader=_Loader)
    except DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}{_where(e)}: invalid YAML: {_problem(e)}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(d).__name__}")
    return d


def _where(e: yaml.YAMLError) -> str:
    """":line:col" of a YAML error (1-based), so editors jump to it."""
    mark = getattr(e, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def _problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem, and what was being parsed where."""
    problem = getattr(e, "problem", None)
    if problem is None:
        return " ".join(str(e).split())
    ctx, mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    return problem + (f" ({ctx} at line {mark.line + 1})" if ctx and mark is not None else "")


def _merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        if k == "adapter" and isinstance(v, dict) and isinstance(out.get(k), dict):
            old = out[k]
            if "kind" in v and v["kind"] != old.get("kind", "moka"):
                old = {n: old[n] for n in ("targets",) if n in old}
            out[k] = {**old, **v}
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_tree(path: Path, sources: _Sources, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"inherit cycle: {chain}")
    d = _read_yaml(path)
    parent = d.pop("inherit", None)
    base = {}
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: inherit = {parent!r}, expected a relative path string")
        parent_path = path.parent / parent
        if not parent_path.is_file():
            raise ConfigError(f"{path}: inherit: file not found: {parent_path}")
        base = _load_tree(parent_path, sources, (*seen, path))
    sources.record(d, str(path))
    return _merge(base, d)


def _apply_override(d: dict, override: str, sources: _Sources) -> dict:
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key=value")
    key, text = override.split("=", 1)
    key = key.strip()
    try:
        value = parse_value(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {override!r}: the value of {key!r} is not valid YAML "
                          f"({_problem(e)}); quote a string value") from None
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"--set {override!r}: bad key {key!r}")
    if parts == ["adapter", "kind"] and isinstance(d.get("adapter"), dict):
        sources.record(value, f"--set {override}", key)
        return _merge(d, {"adapter": {"kind": value}})
    node = d
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not (p.isdigit() and int(p) < len(node)):
                raise ConfigError(f"--set {override!r}: {'.'.join(parts[:i + 1])!r} is out of range")
            if isinstance(node[int(p)], str):  # DataFile shorthand -> mapping
                node[int(p)] = {"path": node[int(p)]}
            node = node[int(p)]
        elif isinstance(node, dict):
            if not isinstance(node.get(p), dict | list):
                node[p] = {}
            node = node[p]
        else:
            raise ConfigError(f"--set {override!r}: cannot index {'.'.join(parts[:i + 1])!r}")
    last = parts[-1]
    if isinstance(node, list):
        if not (last.isdigit() and int(last) < len(node)):
            raise ConfigError(f"--set {override!r}: index {last!r} out of range")
        node[int(last)] = value
    else:
        node[last] = value
    sources.record(value, f"--set {override}", key)
    return d


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """YAML file (+ inherit chain) -> overrides -> Config, with the structural checks and the
    data files' existence. validate(cfg, num_devices) adds the model path and the mesh."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    sources = _Sources(str(path))
    d = _load_tree(path, sources)
    for o in overrides:
        d = _apply_override(d, o, sources)
    if not d.get("name"):
        d["name"] = path.stem
    cfg = config_from_dict(d, source=str(path), _sources=sources)
    _check_data_files(cfg, sources)
    return cfg


def add_config_args(parser):
    """`config` positional + repeatable `--set key=value` on an argparse parser."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-4")
    return parser


def dump_config(cfg: Config) -> str:
    """YAML text that load_config reads back to an equal Config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
