"""A plain dict (from YAML, overrides or the Python API) to the Config tree: types converted,
unknown keys named with a suggestion, domains checked, every error naming the dotted key and
the file it came from."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from moka_jax.support import domains
from moka_jax.adapters import ADAPTER_CONFIGS, adapter_config_from_dict
from moka_jax.config.checks import _check
from moka_jax.config.schema import DEFAULT_TARGETS, AdapterSection, Config, DataFile, _is_dataset
from moka_jax.config.sources import ConfigError, _error, _Sources


def _all_dotted_keys(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        hint = typing.get_type_hints(cls)[f.name]
        if f.name == "adapter" and cls is Config:
            for c in ADAPTER_CONFIGS.values():
                yield from (f"adapter.{n}" for n in _field_names(c))
            yield "adapter.targets"
        elif dataclasses.is_dataclass(hint):
            yield from _all_dotted_keys(hint, key)
        else:
            yield key


def _field_names(cls):
    return [f.name for f in dataclasses.fields(cls)]


def _unknown_key(sources, prefix, key, valid):
    dotted = f"{prefix}.{key}" if prefix else str(key)
    candidates = [f"{prefix}.{v}" if prefix else v for v in valid]
    # The right name in the wrong section (train.cutoff_len) first, then the nearest name,
    # judged on the last part alone: whole dotted names share their section prefix, which
    # passes for a match (train.cutof_len ~ train.schedule). Ties go to this section.
    leaf = lambda k: k.rsplit(".", 1)[-1]
    close = [k for k in _all_dotted_keys() if leaf(k) == str(key)][:1]
    if not close:
        ratio = lambda k: difflib.SequenceMatcher(None, str(key), leaf(k)).ratio()
        pool = [(ratio(c), 1, c) for c in candidates] + [(ratio(k), 0, k) for k in _all_dotted_keys()]
        best, _, name = max(pool, default=(0.0, 0, None))
        close = [name] if best >= 0.6 else []
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {sorted(candidates)}"
    _error(sources, dotted, f"unknown key '{dotted}'{hint}")


_type_name = domains.type_name


def _convert(hint, value, key, sources):
    """Check `value` against the annotation `hint`; return it in canonical form."""
    def bad():
        _error(sources, key, f"{key} = {value!r} ({type(value).__name__}), expected {_type_name(hint)}")

    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = typing.get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            bad()
        for a in (a for a in args if a is not type(None)):
            try:
                return _convert(a, value, key, sources)
            except ConfigError:
                pass
        bad()
    if dataclasses.is_dataclass(hint):
        if hint is DataFile and (isinstance(value, str) or _is_dataset(value)):
            value = {"path": value}
        return _build(hint, value, key, sources)
    if typing.get_origin(hint) is list:
        if not isinstance(value, list | tuple):
            bad()
        (item,) = typing.get_args(hint)
        return [_convert(item, v, f"{key}[{i}]", sources) for i, v in enumerate(value)]
    if hint is tuple:
        if not isinstance(value, list | tuple):
            bad()
        return value
    if hint is bool:
        return value if isinstance(value, bool) else bad()
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else bad()
    if hint is float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else bad()
    if hint is str:
        return value if isinstance(value, str) else bad()
    return value


def _build(cls, d, prefix, sources):
    if not isinstance(d, dict):
        _error(sources, prefix, f"{prefix or 'config'} must be a mapping, got {d!r}")
    names = _field_names(cls)
    for k in d:
        if k not in names:
            _unknown_key(sources, prefix, k, names)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if cls is Config and f.name == "adapter":
            kwargs[f.name] = _build_adapter(d[f.name], sources)
            continue
        if cls is DataFile and f.name == "path" and _is_dataset(d[f.name]):
            kwargs[f.name] = d[f.name]
            continue
        value = _convert(hints[f.name], d[f.name], key, sources)
        _check_domain(sources, key, value, f)
        kwargs[f.name] = value
    if cls is DataFile and "path" not in kwargs:
        _error(sources, prefix, f"{prefix} needs a 'path'")
    return cls(**kwargs)


def _check_domain(sources, key, value, f: dataclasses.Field):
    try:
        domains.check_domain(key, value, domains.field_domain(f))
    except ValueError as e:
        _error(sources, key, str(e))


def _build_adapter(d, sources):
    if not isinstance(d, dict):
        _error(sources, "adapter", f"adapter must be a mapping, got {d!r}")
    d = dict(d)
    kind = d.pop("kind", "moka")
    if kind not in ADAPTER_CONFIGS:
        close = difflib.get_close_matches(str(kind), list(ADAPTER_CONFIGS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        _error(sources, "adapter.kind",
               f"adapter.kind = {kind!r}, expected one of {sorted(ADAPTER_CONFIGS)}{hint}")
    targets = _convert(str | list[str], d.pop("targets", DEFAULT_TARGETS), "adapter.targets",
                       sources)
    cls = ADAPTER_CONFIGS[kind]
    names = [n for n in _field_names(cls) if n != "kind"]
    for k in d:
        if k not in names:
            owners = sorted(n for n, c in ADAPTER_CONFIGS.items() if k in _field_names(c))
            if owners:
                _error(sources, f"adapter.{k}", f"unknown key 'adapter.{k}' for adapter kind "
                       f"{kind!r}; it is an option of {owners}; {kind} options: {names}")
            _unknown_key(sources, "adapter", k, names + ["kind", "targets"])
    hints = typing.get_type_hints(cls)
    options = {k: _convert(hints[k], v, f"adapter.{k}", sources) for k, v in d.items()}
    for f in dataclasses.fields(cls):
        if f.name in options:
            _check_domain(sources, f"adapter.{f.name}", options[f.name], f)
    try:
        config = adapter_config_from_dict({"kind": kind, **options})
    except (ValueError, TypeError) as e:
        _error(sources, "adapter", f"adapter: {e}")
    return AdapterSection(targets=targets, config=config)


def config_from_dict(d: dict, *, source: str = "<dict>", _sources: _Sources | None = None) -> Config:
    """Build and structurally check a Config (keys, types, choices, regex, buckets, batch)."""
    sources = _sources or _Sources(source)
    if _sources is None:
        sources.record(d, source)
    cfg = _build(Config, d or {}, "", sources)
    if "{name}" in cfg.train.out_dir:
        train = dataclasses.replace(cfg.train, out_dir=cfg.train.out_dir.replace("{name}", cfg.name or "run"))
        cfg = dataclasses.replace(cfg, train=train)
    _check(cfg, sources)
    return cfg
