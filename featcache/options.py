"""Option sets declared once: each dataclass field carries its default, help and constraints; one validator.

`option(default, help, choices=..., low=..., high=...)` declares a field of an option set (ExtractSpec,
heads' TrainConfig); `validate(instance)` checks every field against its declaration, with one
message shape for every option ("--batch-size must be an integer >= 1, got 0"), and the CLI builds
its click options from the same declarations, so each default and each bound is written once.
Cross-field rules stay in the option set's own `__post_init__`, after `validate`.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import field, fields

from featcache.errors import BadInputError

#: Value kinds a field may declare; "path" is text or a path-like object, "units" a tuple of positive integers
#: written "400,256,256".
KINDS = ("str", "path", "int", "float", "bool", "units", "any")


def option(default, help: str, *, kind: str = "any", choices=None, low=None, high=None, low_open: bool = False,
           high_open: bool = False, **cli):
    """A dataclass field with its declaration in the metadata. `cli` holds what only the command line needs
    (flag=True, env=VAR, cli=False or the commands that show it), `label`, the name messages use
    (default: the option's flag, --field-name), and `optional=True` for a field that may also be None."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    meta = dict(help=help, kind=kind, choices=None if choices is None else tuple(choices), low=low, high=high,
                low_open=low_open, high_open=high_open, **cli)
    return field(default=default, metadata=meta)


def declared(cls) -> list:
    """The fields of an option set that carry a declaration, in order."""
    return [f for f in fields(cls) if "kind" in f.metadata]


def given_or_built(cls, config, fields: dict, **defaults):
    """The option set `config` (an instance of `cls`) when given, else `cls` built from `fields` (over `defaults`):
    how a function takes its options as one object or as keywords, never both at once."""
    if config is None:
        return cls(**{**defaults, **fields})
    if isinstance(cls, type) and not isinstance(config, cls):   # (a test may stand a factory in for cls)
        raise BadInputError(f"expected a {cls.__name__} (or its fields as keywords), got {type(config).__name__}; "
                            f"fix: pass {cls.__name__}(...) or the fields themselves")
    if fields:
        raise TypeError(f"pass {', '.join(sorted(fields))} inside the {cls.__name__} given, not beside it")
    return config


def flag_name(f) -> str:
    """The option's flag, --field-name, as the command line spells it."""
    return "--" + f.name.replace("_", "-")


def label(f) -> str:
    return f.metadata.get("label") or flag_name(f)


def parse_units(value) -> tuple:
    """'400,256,256' (or a sequence) -> (400, 256, 256); None where it is not positive integers."""
    if isinstance(value, numbers.Number):
        value = (value,)
    try:
        parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else list(value)
    except TypeError:   # not text nor a sequence
        return None
    if isinstance(value, str) and not all(p.isdigit() for p in parts):
        return None
    units = tuple(int(p) if isinstance(p, str) else p for p in parts)
    ok = units and all(isinstance(u, numbers.Integral) and not isinstance(u, bool) and u > 0 for u in units)
    return tuple(int(u) for u in units) if ok else None


def validate(instance) -> None:
    """Check (and normalise: "400,256,256" -> a tuple) every declared field of `instance`, a frozen dataclass."""
    for f in declared(type(instance)):
        value = _checked(f, getattr(instance, f.name))
        object.__setattr__(instance, f.name, value)


def _checked(f, value):
    meta = f.metadata
    if value is None and (f.default is None or meta.get("optional")):   # not set: the option's absence means something
        return value
    kind = meta["kind"]
    if kind == "units":
        units = parse_units(value)
        if units is None or (meta["high"] is not None and max(units) > meta["high"]):
            top = "" if meta["high"] is None else f" (each at most {meta['high']:,})"
            raise BadInputError(f"{label(f)} must be positive integers separated by commas like 400,256,256{top}, "
                                f"got {value!r}")
        return units
    if meta["choices"] is not None and value not in meta["choices"]:
        raise BadInputError(f"{label(f)} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if not _of_kind(value, kind):
        raise BadInputError(f"{label(f)} must be {_KIND_WORDS[kind]}, got {value!r}")
    if not _in_range(value, meta):
        raise BadInputError(f"{label(f)} must be {range_text(meta)}, got {value!r}")
    return float(value) if kind == "float" else value


_KIND_WORDS = {"str": "text", "path": "text or a path", "int": "a whole number", "float": "a finite number",
               "bool": "true or false", "any": "a value"}


def _of_kind(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "path":
        return isinstance(value, (str, os.PathLike))
    return True


def _in_range(value, meta: dict) -> bool:
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        return False
    return high is None or not (value > high or (meta["high_open"] and value == high))


def range_text(meta: dict) -> str:
    """'at least 1', 'greater than 0', 'in [0, 1)', ...: the declared bounds in words."""
    low, high = meta["low"], meta["high"]
    if low is not None and high is not None:
        return f"in {'(' if meta['low_open'] else '['}{low:g}, {high:g}{')' if meta['high_open'] else ']'}"
    if low is not None:
        return f"{'greater than' if meta['low_open'] else 'at least'} {low:g}"
    if high is not None:
        return f"{'less than' if meta['high_open'] else 'at most'} {high:g}"
    return ""
