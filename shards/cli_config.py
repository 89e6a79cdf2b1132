"""Typed configs as click commands, and one-line user errors: what the ``prep`` and ``train`` command lines share.

A config is a ``@dataclass(kw_only=True, frozen=True)``. Each field's ``metadata["help"]`` is its click help and
its type decides the click parameter, so help, default, type and allowed values have one source:

- ``Literal["a", "b"]`` (optionally ``| None``): ``--name [a|b]`` (``click.Choice``);
- ``bool``: a flag, ``--name/--no-name``;
- ``tuple[str, ...]``: a repeatable option, or (``positional``) ``NAME...`` (one or more arguments);
- ``int``, ``float``, ``str`` (optionally ``| None``): ``--name VALUE``;
- ``int | Literal["auto"]`` (a number or one of some words, optionally ``| None``): ``--name VALUE``, where VALUE
  is a number or one of the words (``--tokens-per-micro-batch auto``);
- a field without a default is a required option (or argument), given on the command line or in the file.

Every command also takes ``--config FILE`` (``padless.shards.config_file``: YAML keyed by field name). A field's
value is its default, overridden by the file, overridden by an option given on the command line (click's
parameter source tells a given option from a default, for ``--lora/--qlora/--full`` and ``--x/--no-x`` too).

Other metadata keys: ``positional`` (an argument, not an option), ``flag`` (the option's name when it is not the
field's: ``--map`` for ``maps``), ``metavar``, ``switch`` (a ``Literal`` field given as one flag per value:
``--lora/--qlora/--full``), ``case_insensitive`` (a ``Literal`` option that also takes ``h100`` for ``H100``; the
config receives the Literal's spelling), ``comma_list`` and ``json_object`` (a string option holding a comma list or
a JSON object, which a config file may also give as a YAML list or mapping).

:func:`check_fields` checks an instance against the same types (``__post_init__`` calls it), so a library caller
and the command line get the same error. :class:`Group` prints every user error, click's usage errors included,
as one ``error: ...`` line on stderr and exits with status 2.

Imports nothing of padless: ``prep`` and ``train`` may share only ``padless.shards``.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, Literal, Union

import click
from click.core import ParameterSource

__all__ = [
    "CONFIG_PARAM",
    "USER_ERROR_EXIT",
    "FieldKind",
    "Group",
    "UserError",
    "check_fields",
    "choice",
    "click_options",
    "config_from_params",
    "field_kinds",
    "field_problem",
    "flag_name",
    "one_line",
    "option",
]

USER_ERROR_EXIT = 2  # click's own status for usage errors; every user error of our commands uses it


def option(default: Any = MISSING, *, help: str, **cli: Any) -> Any:
    """A config field whose ``help`` is its click help; ``cli`` holds the other metadata keys (see the module doc)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class FieldKind:
    """What a field's annotation allows: ``base`` (int, float, str, bool, tuple, dict), ``choices`` of a Literal,
    ``words`` that a number field also takes (``int | Literal["auto"]``)."""

    base: type
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    words: tuple[str, ...] = ()


def _kind(annotation: Any) -> FieldKind:
    optional = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(rest) < len(typing.get_args(annotation))
        words = _number_words(rest)
        if words is not None:
            return FieldKind(words[0], None, optional, words[1])
        if len(rest) != 1:
            raise TypeError(
                f"config field type {annotation!r}: only X, X | None and int/float | Literal[words] are supported"
            )
        annotation = rest[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return FieldKind(type(args[0]), args, optional)
    if origin is tuple and args == (str, ...):
        return FieldKind(tuple, None, optional)
    if origin is dict or annotation is dict:
        return FieldKind(dict, None, optional)
    if annotation in (int, float, str, bool):
        return FieldKind(annotation, None, optional)
    raise TypeError(f"config field type {annotation!r} is not supported (see shards.cli_config)")


def _number_words(members: list[Any]) -> tuple[type, tuple[str, ...]] | None:
    """(int or float, the words) when ``members`` are a number type and a Literal of strings; else None."""
    numbers = [m for m in members if m in (int, float)]
    literals = [m for m in members if typing.get_origin(m) is Literal]
    if len(members) != 2 or len(numbers) != 1 or len(literals) != 1:
        return None
    words = typing.get_args(literals[0])
    return (numbers[0], words) if all(isinstance(w, str) for w in words) else None


@functools.cache
def field_kinds(cls: type) -> dict[str, FieldKind]:
    """What each field of ``cls`` allows, by field name."""
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}


def flag_name(cls: type, f: dataclasses.Field) -> str:
    """How the command line names field ``f`` of ``cls``: ``--max-len``, ``--map``, ``--lora/--qlora/--full``,
    ``SHARDS``."""
    if f.metadata.get("positional"):
        return f.name.upper()
    if f.metadata.get("switch"):
        return "/".join(f"--{v}" for v in field_kinds(cls)[f.name].choices or ())
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", tuple: "a tuple of strings",
               dict: "a dict"}  # fmt: skip


def _fits(value: Any, kind: FieldKind) -> bool:
    if isinstance(value, str) and value in kind.words:
        return True
    if kind.choices is not None:
        return any(value == c and type(value) is type(c) for c in kind.choices)
    if kind.base is bool:
        return isinstance(value, bool)
    if kind.base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind.base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind.base is tuple:
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind.base)


def field_problem(cls: type, f: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with ``value`` for field ``f`` of ``cls`` (naming the field, the value and what is allowed),
    or None when its annotation allows it."""
    kind = field_kinds(cls)[f.name]
    if (value is None and kind.optional) or _fits(value, kind):
        return None
    on_cli = "help" in f.metadata and not f.metadata.get("positional")
    name = f"{f.name}={value!r}" + (f" ({flag_name(cls, f)})" if on_cli else "")
    if kind.choices is not None:
        allowed = "one of " + ", ".join(repr(c) for c in kind.choices)
    else:
        allowed = _TYPE_NAMES[kind.base] + "".join(f" or {w!r}" for w in kind.words)
    return f"{name}: expected {allowed}{' or None' if kind.optional else ''}"


def check_fields(config: Any, error: type[Exception]) -> None:
    """Raise ``error`` naming the field, the bad value and what is allowed, for the first field whose value its
    annotation does not allow (a ``Literal`` value outside it, a string for an int, ...).

    A list of strings for a ``tuple[str, ...]`` field is stored as a tuple (the config stays hashable)."""
    cls = type(config)
    for f in dataclasses.fields(cls):
        kind, value = field_kinds(cls)[f.name], getattr(config, f.name)
        if kind.base is tuple and isinstance(value, list):
            value = tuple(value)
            object.__setattr__(config, f.name, value)
        problem = field_problem(cls, f, value)
        if problem is not None:
            raise error(problem)


def choice(literal: Any) -> click.Choice:
    """The ``click.Choice`` of a ``Literal[...]`` type (its values, spelled exactly)."""
    return click.Choice([str(c) for c in typing.get_args(literal)])


class _NumberOrWord(click.ParamType):
    """A click type for an ``int | Literal["auto"]`` field: a number, or one of the words as spelled."""

    def __init__(self, kind: FieldKind) -> None:
        self.kind = kind
        self.name = "|".join([{int: "integer", float: "float"}[kind.base], *kind.words])

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        """``INTEGER|auto``: click's name of the number, the words as they are spelled."""
        return "|".join([{int: "INTEGER", float: "FLOAT"}[self.kind.base], *self.kind.words])

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str) or value in self.kind.words:
            return value
        try:
            return self.kind.base(value)
        except ValueError:
            words = " or ".join(repr(w) for w in self.kind.words)
            self.fail(f"{value!r} is not {_TYPE_NAMES[self.kind.base]} or {words}", param, ctx)


def _metavar(f: dataclasses.Field, kind: FieldKind) -> str:
    """A positional field's name in usage lines: ``SHARDS``, ``DATASETS...``."""
    return f.metadata.get("metavar") or f.name.upper() + ("..." if kind.base is tuple else "")


def _param(f: dataclasses.Field, kind: FieldKind) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    meta, required = f.metadata, f.default is MISSING and f.default_factory is MISSING
    default = None if required else f.default
    click_type: Any = None
    if kind.words:
        click_type = _NumberOrWord(kind)
    elif kind.choices:
        click_type = click.Choice([str(c) for c in kind.choices], case_sensitive=not meta.get("case_insensitive"))
    if meta.get("positional"):
        many = kind.base is tuple
        metavar = _metavar(f, kind)
        # Optional for click: a --config file may give it; config_from_params reports it missing otherwise.
        return click.argument(f.name, nargs=-1 if many else 1, required=False, metavar=metavar, type=click_type or str)
    if meta.get("switch"):
        if not kind.choices:
            raise TypeError(f"{f.name}: a switch field needs a Literal type")

        def switches(command: Callable[..., Any]) -> Callable[..., Any]:
            for value in reversed(kind.choices):
                mark = " (default)" if value == default else ""
                extra = {"default": True} if value == default else {}  # click: only the default's flag is set
                command = click.option(
                    f"--{value}", f.name, flag_value=value, help=f"{meta['help']} {value}{mark}.", **extra
                )(command)
            return command

        return switches
    decl = meta.get("flag") or "--" + f.name.replace("_", "-")
    if kind.base is bool:  # both spellings, so a flag can undo what a --config file set
        decls = [f"{decl}/--no-{decl[2:]}"]
        return click.option(*decls, f.name, is_flag=True, default=bool(default), help=meta["help"])
    if kind.base is tuple:
        return click.option(
            decl, f.name, multiple=True, default=default or (), metavar=meta.get("metavar"), help=meta["help"]
        )
    if kind.base not in (int, float, str):
        raise TypeError(f"{f.name}: a {kind.base.__name__} field cannot be a command-line option; exclude it")
    # A required field is optional for click (a --config file may give it); config_from_params checks it.
    return click.option(
        decl,
        f.name,
        type=click_type or kind.base,
        metavar=meta.get("metavar"),
        help=meta["help"] + ("  [required]" if required else ""),
        default=default,
        show_default=default is not None,
    )


CONFIG_PARAM = "config_file"  # the click parameter name of --config (no config field may have it)


def click_options(
    cls: type, exclude: tuple[str, ...] = (), *, config_note: str = ""
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding ``--config FILE`` and one click argument or option per field of ``cls`` (but
    ``exclude``), in field order; ``config_note`` ends the help of ``--config`` (where a command saves one).

    A field without ``help`` that is not excluded is an error here, so a new field cannot silently miss its help.
    """
    kinds = field_kinds(cls)
    if CONFIG_PARAM in kinds:
        raise TypeError(f"{cls.__name__}.{CONFIG_PARAM}: the name is taken by --config")
    example = next((n for n in kinds if "_" in n and n not in exclude), "name")
    # Only the fields' own arguments can come from the file (a command's other click arguments cannot).
    positional = any(f.metadata.get("positional") for f in dataclasses.fields(cls) if f.name not in exclude)
    config_help = (
        f"YAML (or JSON) file of settings: a mapping of option names ({example} or {example.replace('_', '-')}) to "
        f"values{', positional arguments included' if positional else ''}. Precedence: options given on the command "
        "line override the file, the file overrides the defaults. Relative paths in it are relative to the working "
        "directory."
    )
    params = [
        click.option(
            "--config",
            CONFIG_PARAM,
            default=None,
            metavar="FILE",
            help=config_help + (f" {config_note}" if config_note else ""),
        )
    ]
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no help: declare it with option(help=...) or exclude it")
        params.append(_param(f, kinds[f.name]))

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for param in reversed(params):
            command = param(command)
        return command

    return decorate


_EXPLICIT = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def config_from_params(cls: type, params: dict[str, Any]) -> Any:
    """``cls`` built from click's parsed parameters (their names are the field names; others are ignored) and
    the ``--config`` file among them: a field's default < the file < an option given on the command line.

    Call it inside the command (it asks the current click context where each value came from). A required field
    that neither gives is a usage error naming it."""
    ctx = click.get_current_context()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {k: v for k, v in params.items() if k in fields}
    path = params.get(CONFIG_PARAM)
    if path is not None:
        from .config_file import ConfigFileError, read_config_file  # here: config_file builds on this module

        try:
            from_file = read_config_file(cls, path)
        except ConfigFileError as error:
            raise UserError(str(error)) from error
        for name, value in from_file.items():
            if ctx.get_parameter_source(name) not in _EXPLICIT:
                values[name] = value
    for name, f in fields.items():
        required = f.default is MISSING and f.default_factory is MISSING
        if required and values.get(name) in (None, ()):
            if f.metadata.get("positional"):
                what = f"argument '{_metavar(f, field_kinds(cls)[name])}'"
            else:
                what = f"option '{flag_name(cls, f)}'"
            raise click.UsageError(
                f"Missing {what}: give it on the command line or as '{name}' in a --config file", ctx
            )
    return cls(**values)


def one_line(message: object) -> str:
    """``message`` on one line (its lines joined with ``; ``), for ``error: ...`` output."""
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


class UserError(click.ClickException):
    """A user error shown as ``error: <message>`` on one line of stderr, exit status 2."""

    exit_code = USER_ERROR_EXIT

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {one_line(self.format_message())}", err=True)


def _usage(error: click.UsageError) -> UserError:
    path = error.ctx.command_path if error.ctx is not None else ""
    hint = f" (see {path} --help)" if path else ""
    return UserError(one_line(error.format_message()).rstrip(".") + hint)


class Group(click.Group):
    """A click group whose commands turn ``known_errors`` and click's usage errors into one line and exit 2.

    ``known_errors``: exception types that mean bad input; their messages say what was wrong and what to do.
    Anything else is a bug and keeps its traceback. A command that reports a result through its exit status
    (``prep verify``: 1 when the shard set fails) exits itself.
    """

    def __init__(self, *args: Any, known_errors: tuple[type[BaseException], ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.known_errors = tuple(known_errors)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as error:
            raise _usage(error) from error

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as error:
            raise _usage(error) from error
        except self.known_errors as error:
            raise UserError(str(error)) from error
