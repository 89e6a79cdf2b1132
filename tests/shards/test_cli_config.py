"""shards.cli_config and shards.config_file: dataclass fields -> click parameters and config files, field checks,
and one-line user errors (exit 2)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from padless.shards.cli_config import Group, check_fields, click_options, config_from_params, option
from padless.shards.config_file import config_yaml, read_config_file, write_config_file
from tests.user_errors import assert_one_line_error


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
    max_items: int = option(0, help="A cap (0 = none).")
    batch: int | Literal["auto"] = option(0, help="A count or auto.")
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
        (["go", "--size", "2"], "error: Missing argument 'INPUTS...': give it on the command line or as 'inputs' in"),
        (["go", "a"], "error: Missing option '--size': give it on the command line or as 'size' in a --config file"),
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
        ({"batch": "many"}, "batch='many' (--batch): expected an int or 'auto'"),
        ({"batch": 2.0}, "batch=2.0 (--batch): expected an int or 'auto'"),
    ],
)
def test_check_fields_names_the_field_value_and_allowed(kwargs: dict, message: str) -> None:
    settings = {"inputs": ("a",), "size": 1, **kwargs}
    with pytest.raises(BadInput, match=re.escape(message)):
        Demo(**settings)


def test_a_number_or_word_field_takes_both(tmp_path: Path) -> None:
    """``int | Literal["auto"]``: a number or the word, on the command line, in a file, and written back."""
    assert "batch=7" in _run("go", "a", "--size", "1", "--batch", "7").output
    assert "batch='auto'" in _run("go", "a", "--size", "1", "--batch", "auto").output
    assert_one_line_error(
        _run("go", "a", "--size", "1", "--batch", "lots"),
        r"^error: Invalid value for '--batch': 'lots' is not an int or 'auto' \(see",
    )
    assert "--batch INTEGER|auto" in _run("go", "--help").output
    for text, expected in (("batch: auto", "auto"), ("batch: '12'", None), ("batch: 12", 12)):
        r, demo = _go(tmp_path, f"inputs: [a]\nsize: 1\n{text}\n")
        if expected is None:
            assert_one_line_error(r, r"batch='12' \(--batch\): expected an int or 'auto'$")
        else:
            assert demo.batch == expected
            assert Demo(**read_config_file(Demo, write_config_file(demo, tmp_path / "back.yaml"))) == demo


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


# --config FILE: the file between the defaults and the command line.


def _go(tmp_path: Path, text: str, *args: str, name: str = "go.yaml"):
    """``cli go --config FILE *args`` with ``text`` written to FILE; returns (result, config or None)."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    r = _run("go", "--config", str(path), *args)
    return r, (eval(r.output.strip()) if r.exit_code == 0 else None)  # the repr of a Demo


def test_the_file_overrides_defaults_and_given_options_override_the_file(tmp_path: Path) -> None:
    text = "inputs: [x.txt, y.txt]\nsize: 5\ncolor: green\nratio: 2\ntags: [p, q]\nname: from-file\nmax-items: 7\n"
    r, demo = _go(tmp_path, text)
    assert r.exit_code == 0, r.output
    assert demo == Demo(inputs=("x.txt", "y.txt"), size=5, color="green", ratio=2.0, tags=("p", "q"),
                        name="from-file", max_items=7)  # fmt: skip
    assert isinstance(demo.ratio, float)
    # An option given on the command line wins, also when it spells the default (--color red).
    r, demo = _go(tmp_path, text, "z.txt", "--color", "red", "--size", "9", "--tag", "t", "--max-items", "0")
    assert r.exit_code == 0, r.output
    assert (demo.inputs, demo.color, demo.size, demo.tags, demo.max_items) == (("z.txt",), "red", 9, ("t",), 0)
    assert (demo.ratio, demo.name) == (2.0, "from-file")  # not given: the file's


def test_switches_and_negatable_flags_from_the_file_and_from_the_command_line(tmp_path: Path) -> None:
    text = "inputs: a\nsize: 1\nmode: a\nprogress: false\nverbose: true\n"
    r, demo = _go(tmp_path, text)
    assert r.exit_code == 0, r.output
    assert (demo.mode, demo.progress, demo.verbose) == ("a", False, True)
    # --b and --progress spell the defaults, --no-verbose undoes the file's true: all given, so all win.
    r, demo = _go(tmp_path, text, "--b", "--progress", "--no-verbose")
    assert r.exit_code == 0, r.output
    assert (demo.mode, demo.progress, demo.verbose) == ("b", True, False)
    r, demo = _go(tmp_path, text, "--c")
    assert (demo.mode, demo.progress, demo.verbose) == ("c", False, True)


def test_both_spellings_flag_names_and_a_field_without_a_flag(tmp_path: Path) -> None:
    r, demo = _go(tmp_path, "inputs: [a]\nsize: 1\nmax_items: 3\ntag: [u]\nsecret: 4\n")
    assert r.exit_code == 0, r.output
    assert (demo.max_items, demo.tags, demo.secret) == (3, ("u",), 4)
    r, demo = _go(tmp_path, "inputs: [a]\nsize: 1\nmax-items: 4\n")
    assert demo.max_items == 4
    line = assert_one_line_error(_go(tmp_path, "inputs: [a]\nsize: 1\nmax_items: 3\nmax-items: 4\n")[0], "twice")
    assert "max_items is given twice (as 'max_items' and 'max-items')" in line


def test_values_are_read_as_their_field_types(tmp_path: Path) -> None:
    """YAML 1.1 would read off as False, 2e-4 as a string and 010 as 8; the field's type decides instead."""
    text = "inputs: off\nsize: 010\nratio: 2e-4\nname: off\nlevel: high\nshade: ~\ntags: [7e9, 'yes', null-ish]\n"
    r, demo = _go(tmp_path, text)
    assert r.exit_code == 0, r.output
    assert demo == Demo(inputs=("off",), size=10, ratio=2e-4, name="off", level="High", tags=("7e9", "yes", "null-ish"))
    r, demo = _go(tmp_path, '{"inputs": ["a"], "size": 2, "name": null, "verbose": true}', name="go.json")
    assert r.exit_code == 0, r.output
    assert (demo.inputs, demo.size, demo.name, demo.verbose) == (("a",), 2, None, True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("inputs: [a]\nsize: abc\n", r"--config '.*go.yaml': size='abc' \(--size\): expected an int$"),
        ("inputs: [a]\nsize: '3'\n", r"--config '.*go.yaml': size='3' \(--size\): expected an int$"),
        ("inputs: [a]\nsize: 1.5\n", r"size=1.5 \(--size\): expected an int"),
        ("inputs: [a]\nsize: 1\ncolor: blue\n", r"go.yaml': color='blue' \(--color\): expected one of 'red', 'green'"),
        ("inputs: [a]\nsize: 1\nmode: d\n", r"go.yaml': mode='d' \(--a/--b/--c\): expected one of 'a', 'b', 'c'"),
        ("inputs: [a]\nsize: 1\nverbose: maybe\n", r"verbose='maybe' \(--verbose\): expected true or false"),
        ("inputs: [a]\nsize: 1\ntags: {a: 1}\n", r"tags=\{'a': 1\} \(--tag\): expected a tuple of strings"),
        ("inputs: [a]\nsize: 1\nratio: [1]\n", r"ratio=\[1\] \(--ratio\): expected a number"),
        ("inputs: [a]\nsize: 0\n", r"^error: --size must be >= 1, got 0$"),  # the config's own checks still run
        ("inputs: [a]\nsize: 1\nsizes: 2\n", r"go.yaml': unknown key 'sizes' \(did you mean 'size'\?\); valid keys: "
         r"inputs, size, color, shade, ratio, tags, verbose, progress, name, mode, level, max_items, batch, secret "
         r"\(or"),
        ("inputs: [a]\nsize: 1\nwhatever: 2\n", r"unknown key 'whatever'; valid keys: inputs, size"),
        ("inputs: [a]\n1: 2\n", r"unknown key '1'; valid keys"),
        ("", r"--config '.*go.yaml' is empty; expected a mapping of option names to values, e.g. 'seed: 1'"),
        ("# only a comment\n", r"is empty; expected a mapping"),
        ("- a\n- b\n", r"go.yaml' holds a list; expected a mapping of option names to values"),
        ("just text\n", r"go.yaml' holds the single value 'just text'; expected a mapping"),
        ("size: [1\n", r"not valid YAML: while parsing a flow sequence; expected ',' or ']', .* at line 2, column 1$"),
        ("size: 1\n---\nsize: 2\n", r"not valid YAML: expected a single document in the stream; but found another"),
        ("inputs: [a]\n", r"^error: Missing option '--size': give it on the command line or as 'size' in a --config"),
        ("size: 1\n", r"^error: Missing argument 'INPUTS...': give it on the command line or as 'inputs' in"),
        ("inputs: []\nsize: 1\n", r"^error: Missing argument 'INPUTS...'"),
    ],
)  # fmt: skip
def test_a_bad_file_is_one_error_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    assert_one_line_error(_go(tmp_path, text)[0], message)


@pytest.mark.parametrize("text", ['inputs = ["a"]\nsize = 1\n', "[go]\nsize = 1\n"])
def test_a_toml_file_is_named_as_such(tmp_path: Path, text: str) -> None:
    """A .toml file is refused as TOML, not as YAML's 'holds the single value' or 'not valid YAML'."""
    result = _go(tmp_path, text, name="run.toml")[0]
    assert_one_line_error(result, r"--config '.*run.toml' is a TOML file; a config is YAML \(or JSON\): write 'key: ")


def test_an_unreadable_file_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(_run("go", "--config", str(tmp_path / "nope.yaml")), r"nope.yaml' cannot be read \(No such")
    assert_one_line_error(_run("go", "--config", str(tmp_path)), r"cannot be read \(Is a directory\)")
    (tmp_path / "bin.yaml").write_bytes(b"size: \xff\n")
    assert_one_line_error(_run("go", "--config", str(tmp_path / "bin.yaml")), r"bin.yaml' is not UTF-8 text")


def test_help_states_the_precedence() -> None:
    help_text = " ".join(_run("go", "--help").output.split())
    assert "--config FILE YAML (or JSON) file of settings: a mapping of option names (max_items or max-items)" in (
        help_text
    )
    assert "options given on the command line override the file, the file overrides the defaults" in help_text
    assert "--verbose / --no-verbose" in help_text and "--size INTEGER A required size. [required]" in help_text


@dataclass(kw_only=True, frozen=True)
class OptionsOnly:
    size: int = option(1, help="A size.")


def test_help_says_positional_arguments_come_from_the_file_only_where_the_config_has_them(tmp_path: Path) -> None:
    @click.command()
    @click.argument("target")  # an argument of the command, not of the config: the file cannot give it
    @click_options(OptionsOnly)
    def stats(target: str, **params) -> None:
        click.echo(repr(config_from_params(OptionsOnly, params)))

    assert "positional arguments included" in " ".join(_run("go", "--help").output.split())
    help_text = " ".join(CliRunner().invoke(stats, ["--help"]).output.split())
    assert "a mapping of option names to values. Precedence:" in help_text.replace(" (name or name)", "")
    assert "positional" not in help_text


def test_a_written_config_reads_back_as_the_same_config(tmp_path: Path) -> None:
    demo = Demo(inputs=("a b", "off", "7e9", "", "null", "é"), size=3, color="green", shade="red", ratio=1e-10,
                tags=("yes", "\n### Response:\n", "x: y", "#"), verbose=True, progress=False, name="1e-4",
                mode="c", level="High", max_items=12, secret=-1)  # fmt: skip
    text = config_yaml(demo, header=["first line", "second line"])
    assert text.startswith("# first line\n# second line\n\n# INPUTS: Input files.\ninputs:\n- a b\n")
    assert "# --a/--b/--c: The mode:\nmode: c\n" in text and "# No command-line option.\nsecret: -1\n" in text
    path = write_config_file(demo, tmp_path / "saved.yaml", header=["x"])
    assert Demo(**read_config_file(Demo, path)) == demo
    assert [p.name for p in tmp_path.iterdir()] == ["saved.yaml"]  # the temp file is gone
    # reset: written with the default (here: verbose back to False), the rest unchanged.
    write_config_file(demo, path, reset=("verbose",))
    assert Demo(**read_config_file(Demo, path)) == dataclasses.replace(demo, verbose=False)
    # And through the command line: the saved file alone replays the same config.
    r = _run("go", "--config", str(path))
    assert r.exit_code == 0, r.output
    assert eval(r.output.strip()) == dataclasses.replace(demo, verbose=False, secret=-1)
