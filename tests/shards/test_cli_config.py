"""shards.cli_config: dataclass fields -> click parameters, field checks, and one-line user errors (exit 2)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from padless.shards.cli_config import Group, check_fields, click_options, config_from_params, option


class BadInput(ValueError):
    pass


Color = Literal["red", "green"]


@dataclass(kw_only=True, frozen=True)
class Demo:
    inputs: tuple[str, ...] = option(help="Input files.", positional=True)
    size: int = option(help="A required size.")
    color: Color = option("red", help="A colour.")
    shade: Color | None = option(None, help="An optional colour.")
    ratio: float = option(0.5, help="A ratio.")
    tags: tuple[str, ...] = option((), help="Repeatable tag.", flag="--tag", metavar="TAG")
    verbose: bool = option(False, help="Say more.")
    progress: bool = option(True, help="Show progress.")
    name: str | None = option(None, help="A name.")
    mode: Literal["a", "b", "c"] = option("b", help="The mode:", switch=True)
    level: Literal["Low", "High"] = option("Low", help="Any case.", case_insensitive=True)
    secret: int | None = None  # library-only

    def __post_init__(self) -> None:
        check_fields(self, BadInput)
        if self.size < 1:
            raise BadInput(f"--size must be >= 1, got {self.size}")


def _cli() -> click.Group:
    @click.group(cls=Group, known_errors=(BadInput,))
    def cli() -> None:
        pass

    @cli.command("go")
    @click_options(Demo, exclude=("secret",))
    def go(**params) -> None:
        click.echo(repr(config_from_params(Demo, params)))

    @cli.command("crash")
    def crash() -> None:
        raise KeyError("a bug keeps its traceback")

    return cli


def _run(*args: str):
    return CliRunner().invoke(_cli(), list(args))


def test_fields_become_the_right_parameters() -> None:
    r = _run("go", "a.txt", "b.txt", "--size", "3", "--color", "green", "--tag", "x", "--tag", "y", "--verbose",
             "--no-progress", "--ratio", "2", "--c")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.output.strip() == repr(
        Demo(
            inputs=("a.txt", "b.txt"),
            size=3,
            color="green",
            tags=("x", "y"),
            verbose=True,
            progress=False,
            ratio=2.0,
            mode="c",
        )
    )
    assert "level='High'" in _run("go", "a", "--size", "1", "--level", "high").output
    assert _run("go", "a", "--size", "1", "--color", "RED").exit_code == 2  # exact spelling by default
    r = _run("go", "a", "--size", "1")
    assert "color='red'" in r.output and "mode='b'" in r.output and "progress=True" in r.output
    help_text = _run("go", "--help").output
    for expected in ("INPUTS...", "--size INTEGER", "[required]", "--color [red|green]", "--tag TAG",
                     "--progress / --no-progress", "--a", "The mode: b (default).", "Repeatable tag."):  # fmt: skip
        assert expected in help_text, expected
    assert "--secret" not in help_text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["go", "a", "--size", "0"], "error: --size must be >= 1, got 0"),
        (["go", "a", "--size", "2", "--color", "blue"], "error: Invalid value for '--color': 'blue' is not one of"),
        (["go", "a", "--size", "x"], "error: Invalid value for '--size': 'x' is not a valid integer"),
        (["go", "--size", "2"], "error: Missing argument 'INPUTS...' (see cli go --help)"),
        (["go", "a"], "error: Missing option '--size'"),
        (["go", "a", "--size", "2", "--bogus"], "error: No such option '--bogus'"),
        (["nope"], "error: No such command 'nope'"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    r = _run(*args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert r.stdout == ""


def test_a_bug_is_not_a_user_error() -> None:
    r = _run("crash")
    assert r.exit_code == 1 and isinstance(r.exception, KeyError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"color": "blue"}, "color='blue' (--color): expected one of 'red', 'green'"),
        ({"shade": "blue"}, "shade='blue' (--shade): expected one of 'red', 'green' or None"),
        ({"size": "3"}, "size='3' (--size): expected an int"),
        ({"size": True}, "size=True (--size): expected an int"),
        ({"ratio": "0.1"}, "ratio='0.1' (--ratio): expected a number"),
        ({"verbose": 1}, "verbose=1 (--verbose): expected true or false"),
        ({"tags": ("x", 2)}, "tags=('x', 2) (--tag): expected a tuple of strings"),
        ({"mode": "d"}, "mode='d' (--a/--b/--c): expected one of 'a', 'b', 'c'"),
        ({"inputs": "a.txt"}, "inputs='a.txt': expected a tuple of strings"),
        ({"secret": 1.5}, "secret=1.5: expected an int or None"),
    ],
)
def test_check_fields_names_the_field_value_and_allowed(kwargs: dict, message: str) -> None:
    settings = {"inputs": ("a",), "size": 1, **kwargs}
    with pytest.raises(BadInput, match=re.escape(message)):
        Demo(**settings)


def test_check_fields_accepts_ints_for_floats_and_lists_for_tuples() -> None:
    demo = Demo(inputs=["a", "b"], size=1, ratio=1)
    assert demo.inputs == ("a", "b") and hash(demo)


def test_a_field_without_help_or_of_an_unknown_type_is_refused() -> None:
    @dataclass(kw_only=True, frozen=True)
    class NoHelp:
        x: int = 1

    with pytest.raises(TypeError, match=r"NoHelp.x has no help"):
        click_options(NoHelp)

    @dataclass(kw_only=True, frozen=True)
    class Weird:
        x: list[int] = option(None, help="?")

    with pytest.raises(TypeError, match=r"list\[int\].* is not supported"):
        click_options(Weird)
