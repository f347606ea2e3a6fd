"""Flags from dataclass fields (issue 28): each setting's name, type, default, help and environment variable
are written once, as a field; ``visualchat.flags`` turns fields into flags, and ``app.py`` builds its flags
from ``ServeOptions``, ``Limits`` and ``AppOptions``."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from visualchat.flags import add_flags, from_env, values
from visualchat.limits import parse_size


@dataclass
class Planted:
    name: str | None = field(default=None, metadata={"help": "a name", "env": "PLANTED_NAME", "metavar": "N"})
    count: int = field(default=3, metadata={"help": "how many", "env": ("PLANTED_COUNT", "OTHER_COUNT")})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "how"})
    kind: Literal["a", "b"] | None = field(default=None, metadata={"help": "which", "flags": ("--kind-of", "--k")})
    on: bool = field(default=True, metadata={"help": "turn it off", "env": "PLANTED_ON"})
    off: bool = field(default=False, metadata={"help": "turn it on"})
    size: int = field(default=10, metadata={"help": "bytes", "parse": lambda v: parse_size(v, "size")})


def parser(defaults: Planted) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_flags(p, defaults, [f.name for f in dataclasses.fields(Planted)])
    return p


def test_a_dataclass_becomes_flags(monkeypatch):
    p = parser(Planted())
    helps = {a.dest: a for a in p._actions}
    assert helps["name"].help == "a name [PLANTED_NAME]" and helps["name"].metavar == "N"
    assert helps["count"].help == "how many [PLANTED_COUNT or OTHER_COUNT]" and helps["count"].type is int
    assert helps["mode"].choices == ("fast", "slow")
    assert helps["kind_of"].option_strings == ["--kind-of", "--k"] and helps["kind_of"].choices == ("none", "a", "b")
    assert helps["on"].option_strings == ["--no-on"] and helps["off"].option_strings == ["--off"]
    a = p.parse_args(["--name", "x", "--count", "5", "--mode", "slow", "--k", "b", "--no-on", "--off",
                      "--size", "2kb"])
    assert values(a, Planted) == dict(name="x", count=5, mode="slow", kind="b", on=False, off=True, size=2000)
    assert values(p.parse_args([]), Planted) == dataclasses.asdict(Planted())  # "none" is None again
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "medium"])
    # the defaults from the environment, read as the flag reads them (first variable set wins)
    monkeypatch.setenv("OTHER_COUNT", "7")
    monkeypatch.setenv("PLANTED_ON", "0")
    monkeypatch.setenv("PLANTED_NAME", "from-env")
    env = from_env(Planted)
    assert (env.count, env.on, env.name) == (7, False, "from-env")
    assert parser(env).parse_args([]).count == 7
    monkeypatch.setenv("PLANTED_COUNT", "lots")
    with pytest.raises(ValueError, match="environment variable PLANTED_COUNT='lots'"):
        from_env(Planted)


def test_every_serving_and_web_option_is_a_flag_of_the_app_with_its_fields_help(capsys):
    import app
    from visualchat.limits import Limits
    from visualchat.server import ServeOptions

    classes = {"serve": ServeOptions, "app": app.AppOptions, "limits": Limits}
    flagged = {(classes[kind], name) for _, kind, names in app.FLAGS for name in names}
    for cls, not_flags in ((ServeOptions, {"limits"}), (app.AppOptions, set()),
                           (Limits, {"max_pixels", "max_side", "max_aspect"})):  # (these: variables only)
        missing = {f.name for f in dataclasses.fields(cls)} - not_flags - {n for c, n in flagged if c is cls}
        assert not missing, f"{cls.__name__} fields without a flag: {missing}"
    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in classes.values():
        for f in dataclasses.fields(cls):
            if f.name != "limits":  # every field's help text and variable, the limits without a flag in the epilog
                assert " ".join(f.metadata["help"].split()) in text, (cls.__name__, f.name)
                assert all(env in text for env in ([f.metadata["env"]] if isinstance(f.metadata["env"], str)
                                                   else f.metadata["env"])), (cls.__name__, f.name)
