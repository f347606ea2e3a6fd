"""Command-line flags and environment variables from a dataclass's fields, so that each setting's name,
type, default, help text and variable are written once, as a field.

A field's type gives its flag's value type, its choices (a ``Literal``'s values, and ``none`` for an
optional one) or makes it a switch (``bool``: ``--name``, or ``--no-name`` when it defaults to on). Its
metadata holds the rest: ``help``; ``env``, the variable (or variables, first set wins) that sets its
default; ``flags``, other flag names than ``--name-with-dashes``; ``parse``, a function that reads a value
given as text (``25mb``). ``app.py`` builds its flags from :class:`visualchat.server.ServeOptions`,
:class:`visualchat.limits.Limits` (whose variables only :meth:`~visualchat.limits.Limits.from_env` reads)
and its own options this way.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Literal, Sequence, Union, get_args, get_origin, get_type_hints

_TRUE = ("1", "true", "yes", "on")


def field_spec(cls, name: str) -> dict:
    """How field ``name`` of dataclass ``cls`` reads from text: ``type`` (a callable), ``choices`` (a
    ``Literal``'s values, with ``"none"`` first when the field may be None) or ``switch`` (a bool)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = get_type_hints(cls)[name]
    optional = get_origin(hint) is Union and type(None) in get_args(hint)
    if optional:
        hint = next(a for a in get_args(hint) if a is not type(None))
    if "parse" in f.metadata:
        return {"type": _flag_type(f.metadata["parse"], name)}
    if hint is bool:
        return {"switch": True}
    if get_origin(hint) is Literal:
        return {"choices": (("none",) if optional else ()) + get_args(hint)}
    return {"type": hint} if hint in (int, float) else {}


def _flag_type(parse, name: str):
    def read(text: str):
        try:
            return parse(text)
        except ValueError as e:  # argparse says "argument --flag: <message>"
            raise argparse.ArgumentTypeError(str(e)) from None
    read.__name__ = name
    return read


def dest(f: dataclasses.Field) -> str:
    """The name of field ``f``'s value in argparse's namespace: the field's, or its first flag's when the
    metadata names its flags (``--max-file-size``: ``max_file_size``)."""
    return f.metadata["flags"][0].lstrip("-").replace("-", "_") if "flags" in f.metadata else f.name


def env_names(f: dataclasses.Field) -> tuple[str, ...]:
    env = f.metadata.get("env", ())
    return (env,) if isinstance(env, str) else tuple(env)


def from_env(cls, **given):
    """An instance of ``cls``: ``given`` values, else each field's environment variable (``env``) where set,
    read as its flag would read it, else the field's default."""
    kw = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in kw:
            continue
        var = next((v for v in env_names(f) if os.environ.get(v, "") != ""), None)
        if var is None:
            continue
        text, spec = os.environ[var], field_spec(cls, f.name)
        try:
            kw[f.name] = (text.strip().lower() in _TRUE if spec.get("switch") else
                          None if text == "none" and "none" in spec.get("choices", ()) else
                          spec["type"](text) if "type" in spec else text)
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise ValueError(f"environment variable {var}={text!r}: {e}") from None
    return cls(**kw)


def add_flags(group, defaults, names: Sequence[str]) -> None:
    """Add to ``group`` (an argparse parser or group) the flag of each field in ``names`` of the dataclass
    instance ``defaults``, whose values are the flags' defaults; the help names the field's variables."""
    cls = type(defaults)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f, spec = fields[name], field_spec(cls, name)
        default = getattr(defaults, name)
        envs = env_names(f)
        help_ = f.metadata["help"] + (f" [{' or '.join(envs)}]" if envs else "")
        dashed = "--" + name.replace("_", "-")
        if spec.pop("switch", False):
            on = f.default is True  # a setting that is on unless turned off: --no-name
            group.add_argument(*f.metadata.get("flags", ("--no-" + dashed[2:] if on else dashed,)), dest=dest(f),
                               action="store_false" if on else "store_true", default=default, help=help_)
            continue
        if default is None and "none" in spec.get("choices", ()):
            default = "none"
        group.add_argument(*f.metadata.get("flags", (dashed,)), dest=dest(f), default=default, help=help_,
                           metavar=f.metadata.get("metavar"), **spec)


def values(args: argparse.Namespace, cls) -> dict[str, Any]:
    """The values of ``cls``'s fields that ``args`` has (from :func:`add_flags`), ``"none"`` read as None."""
    out = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, dest(f)):
            v = getattr(args, dest(f))
            out[f.name] = None if v == "none" and "none" in field_spec(cls, f.name).get("choices", ()) else v
    return out
