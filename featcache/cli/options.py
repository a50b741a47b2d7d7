"""Click options built from the declarations of an option set (`featcache.options`): one default, one help
text, one set of bounds per option, for the Python API and the command line alike."""

from __future__ import annotations

import click

from featcache.options import flag_name, parse_units


class UnitsType(click.ParamType):
    """`400,256,256` -> (400, 256, 256): positive integers, at least one."""

    name = "N,N,..."

    def convert(self, value, param, ctx):
        units = value if isinstance(value, tuple) else parse_units(str(value))
        if not units:
            self.fail(f"expected positive integers separated by commas such as 400,256,256, got {value!r}",
                      param, ctx)
        return units


def _type(meta: dict):
    """The click type of a declaration: its choices, bounds or kind."""
    if meta.get("choices"):
        return click.Choice(meta["choices"])
    bounds = dict(min=meta["low"], max=meta["high"], min_open=meta["low_open"], max_open=meta["high_open"])
    if meta["kind"] == "int":
        return click.IntRange(**bounds) if meta["low"] is not None or meta["high"] is not None else int
    if meta["kind"] == "float":
        return click.FloatRange(**bounds)
    if meta["kind"] == "units":
        return UnitsType()
    if meta.get("path"):
        return click.Path(file_okay=False)
    return None


def click_option(f, *, name: str | None = None, ignore_env: bool = False):
    """A click option from one declared field: its default, help, choices, bounds and environment variable.
    A field declared `flag=True` is an on-switch; `flag="--no-x"` is the switch that turns a default-on field off."""
    meta = f.metadata
    flag = meta.get("flag")
    if isinstance(flag, str):
        return click.option(flag, f.name, is_flag=True, flag_value=False, default=True, help=meta["help"])
    if flag:
        return click.option(name or flag_name(f), f.name, is_flag=True, help=meta["help"])
    default = list(f.default) if isinstance(f.default, tuple) else f.default
    kw = dict(help=meta["help"], default=",".join(map(str, default)) if meta["kind"] == "units" else default,
              show_default=f.default is not None and "default:" not in meta["help"], type=_type(meta))
    if "env" in meta and not ignore_env:
        kw["envvar"] = meta["env"]
    return click.option(name or flag_name(f), f.name, **kw)


def add_options(fields):
    """A decorator adding one click option per declared field, in the fields' order."""
    def decorate(command):
        for f in reversed(list(fields)):
            command = click_option(f)(command)
        return command
    return decorate
