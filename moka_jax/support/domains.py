"""Value domains: each option declares its allowed values once, checked alike everywhere.

    lr: float = field(default=2e-4, metadata=domain("> 0"))     # a config / API dataclass field
    check("top_p", top_p, float, "(0, 1]")                       # a function argument
    ap.add_argument("--top-p", type=arg(float, "(0, 1]"))        # an argparse option

A domain is written as an interval: "> 0", ">= 1", "[0, 1)", "(0, 1]", optionally with extra
allowed values ("-1 or >= 1"), or as choices (domain(choices=("nf4", "int4"))). Lists are
checked element by element. Wrong types raise TypeError, values outside the domain ValueError;
both name the option, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import re
import types
import typing

COUNT = ">= 1"          # steps, sizes, ranks, tokens, beams
NON_NEGATIVE = ">= 0"   # seeds, warm-up, shots, temperatures, weight decay
POSITIVE = "> 0"        # learning rates, scales, epsilons
FRACTION = "[0, 1]"
BETA = "[0, 1)"         # Adam's moment decay: 1 never forgets, so the estimate never moves
TOP_P = "(0, 1]"        # nucleus mass: 0 keeps nothing


@dataclasses.dataclass(frozen=True)
class Domain:
    lo: float = -math.inf
    hi: float = math.inf
    lo_closed: bool = False
    hi_closed: bool = False
    extra: tuple = ()       # also allowed (e.g. -1 = "the rest")
    choices: tuple = ()     # if given, the only allowed values
    text: str = ""

    def __contains__(self, v) -> bool:
        if self.choices:
            return v in self.choices
        if v in self.extra:
            return True
        if isinstance(v, float) and math.isnan(v):
            return False
        above = v >= self.lo if self.lo_closed else v > self.lo
        below = v <= self.hi if self.hi_closed else v < self.hi
        return above and below

    def __str__(self) -> str:
        return f"one of {list(self.choices)}" if self.choices else self.text


_NUM = r"[-+]?(?:inf|\d+(?:\.\d*)?(?:e[-+]?\d+)?)"


@functools.lru_cache(maxsize=None)
def parse(text: str) -> Domain:
    """"> 0", ">= 1", "[0, 1)", "(0, 1]", "-1 or >= 1" -> Domain."""
    *extras, main = [p.strip() for p in text.split(" or ")]
    kw = {"extra": tuple(int(float(e)) if float(e).is_integer() else float(e) for e in extras)}
    if m := re.fullmatch(rf"(>=|>|<=|<)\s*({_NUM})", main):
        op, v = m.group(1), float(m.group(2))
        kw |= ({"lo": v, "lo_closed": op == ">="} if op[0] == ">" else
               {"hi": v, "hi_closed": op == "<="})
    elif m := re.fullmatch(rf"([\[(])\s*({_NUM})\s*,\s*({_NUM})\s*([\])])", main):
        kw |= {"lo": float(m.group(2)), "hi": float(m.group(3)), "lo_closed": m.group(1) == "[",
               "hi_closed": m.group(4) == "]"}
    else:
        raise ValueError(f"domain {text!r}: expected '> a', '>= a', '[a, b)' ... [or 'v or ...']")
    main_text = main if main[0] in "<>" else f"in {main}"
    return Domain(text=" or ".join([*extras, main_text]), **kw)


def domain(text: str | None = None, *, choices=()) -> dict:
    """Field metadata: `field(default=..., metadata=domain(">= 1"))`."""
    return {"domain": Domain(choices=tuple(choices)) if choices else parse(text)}


def _as_domain(d) -> Domain | None:
    if d is None or isinstance(d, Domain):
        return d
    return parse(d)


def check_domain(name: str, value, dom) -> None:
    """ValueError unless `value` (or each element of a list / tuple) lies in `dom`."""
    dom = _as_domain(dom)
    if dom is None or value is None:
        return
    if isinstance(value, list | tuple) and not dom.choices:
        for i, v in enumerate(value):
            check_domain(f"{name}[{i}]", v, dom)
        return
    if value not in dom:
        raise ValueError(f"{name} = {value!r}, expected {dom}")


def type_name(hint) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (list, tuple):
        args = typing.get_args(hint)
        return f"list of {type_name(args[0])}" if args else "list"
    return getattr(hint, "__name__", str(hint))


def type_ok(hint, value) -> bool:
    """Whether `value` fits the annotation (int is not bool; a float option takes an int)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(type_ok(a, value) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is typing.Any:
        return True
    origin = typing.get_origin(hint)
    if hint in (list, tuple) or origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, list | tuple) and (not args or all(type_ok(args[0], v)
                                                                    for v in value))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def check(name: str, value, hint, dom=None):
    """The shared checker: TypeError for the wrong type, ValueError outside `dom`; returns value."""
    if not type_ok(hint, value):
        raise TypeError(f"{name} = {value!r} ({type(value).__name__}), expected {type_name(hint)}")
    check_domain(name, value, dom)
    return value


def field_domain(f: dataclasses.Field) -> Domain | None:
    return f.metadata.get("domain")


def check_fields(obj) -> None:
    """Type and domain of every field of a dataclass instance (call from __post_init__)."""
    cls = type(obj)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(obj):
        check(f"{cls.__name__}.{f.name}", getattr(obj, f.name), hints[f.name], field_domain(f))


def arg(kind, dom=None, *, none: str | None = None):
    """An argparse `type=` that parses `kind` and checks `dom` (argparse then exits with 2).

    none: a word (e.g. "none") that stands for None.
    """
    dom = _as_domain(dom)

    def parse_arg(text: str):
        if none is not None and text.lower() == none:
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if dom is not None and value not in dom:
            raise argparse.ArgumentTypeError(f"{text}, expected {dom}")
        return value

    parse_arg.__name__ = kind.__name__
    return parse_arg


__all__ = ["BETA", "COUNT", "Domain", "FRACTION", "NON_NEGATIVE", "POSITIVE", "TOP_P", "arg",
           "check", "check_domain", "check_fields", "domain", "field_domain", "parse",
           "type_name", "type_ok"]
