"""Typed configs as click commands, and one-line user errors: what the ``prep`` and ``train`` command lines share.

A config is a ``@dataclass(kw_only=True, frozen=True)``. Each field's ``metadata["help"]`` is its click help and
its type decides the click parameter, so help, default, type and allowed values have one source:

- ``Literal["a", "b"]`` (optionally ``| None``): ``--name [a|b]`` (``click.Choice``);
- ``bool``: a flag, ``--name`` when the default is False, ``--name/--no-name`` when it is True;
- ``tuple[str, ...]``: a repeatable option, or (``positional``) ``NAME...`` (one or more arguments);
- ``int``, ``float``, ``str`` (optionally ``| None``): ``--name VALUE``;
- a field without a default is a required option (or argument).

Other metadata keys: ``positional`` (an argument, not an option), ``flag`` (the option's name when it is not the
field's: ``--map`` for ``maps``), ``metavar``, ``switch`` (a ``Literal`` field given as one flag per value:
``--lora/--qlora/--full``), ``case_insensitive`` (a ``Literal`` option that also takes ``h100`` for ``H100``; the
config receives the Literal's spelling).

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

__all__ = [
    "USER_ERROR_EXIT",
    "Group",
    "UserError",
    "check_fields",
    "choice",
    "click_options",
    "config_from_params",
    "flag_name",
    "one_line",
    "option",
]

USER_ERROR_EXIT = 2  # click's own status for usage errors; every user error of our commands uses it


def option(default: Any = MISSING, *, help: str, **cli: Any) -> Any:
    """A config field whose ``help`` is its click help; ``cli`` holds the other metadata keys (see the module doc)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class _Kind:
    """What a field's annotation allows: ``base`` (int, float, str, bool, tuple, dict), ``choices`` of a Literal."""

    base: type
    choices: tuple[Any, ...] | None = None
    optional: bool = False


def _kind(annotation: Any) -> _Kind:
    optional = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(rest) < len(typing.get_args(annotation))
        if len(rest) != 1:
            raise TypeError(f"config field type {annotation!r}: only X or X | None is supported")
        annotation = rest[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return _Kind(type(args[0]), args, optional)
    if origin is tuple and args == (str, ...):
        return _Kind(tuple, None, optional)
    if origin is dict or annotation is dict:
        return _Kind(dict, None, optional)
    if annotation in (int, float, str, bool):
        return _Kind(annotation, None, optional)
    raise TypeError(f"config field type {annotation!r} is not supported (see shards.cli_config)")


@functools.cache
def _kinds(cls: type) -> dict[str, _Kind]:
    hints = typing.get_type_hints(cls)
    return {f.name: _kind(hints[f.name]) for f in dataclasses.fields(cls)}


def flag_name(cls: type, f: dataclasses.Field) -> str:
    """How the command line names field ``f`` of ``cls``: ``--max-len``, ``--map``, ``--lora/--qlora/--full``,
    ``SHARDS``."""
    if f.metadata.get("positional"):
        return f.name.upper()
    if f.metadata.get("switch"):
        return "/".join(f"--{v}" for v in _kinds(cls)[f.name].choices or ())
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", tuple: "a tuple of strings",
               dict: "a dict"}  # fmt: skip


def _fits(value: Any, kind: _Kind) -> bool:
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


def check_fields(config: Any, error: type[Exception]) -> None:
    """Raise ``error`` naming the field, the bad value and what is allowed, for the first field whose value its
    annotation does not allow (a ``Literal`` value outside it, a string for an int, ...).

    A list of strings for a ``tuple[str, ...]`` field is stored as a tuple (the config stays hashable)."""
    cls = type(config)
    for f in dataclasses.fields(cls):
        kind, value = _kinds(cls)[f.name], getattr(config, f.name)
        if kind.base is tuple and isinstance(value, list):
            value = tuple(value)
            object.__setattr__(config, f.name, value)
        if (value is None and kind.optional) or _fits(value, kind):
            continue
        on_cli = "help" in f.metadata and not f.metadata.get("positional")
        name = f"{f.name}={value!r}" + (f" ({flag_name(cls, f)})" if on_cli else "")
        if kind.choices is not None:
            allowed = "one of " + ", ".join(repr(c) for c in kind.choices)
        else:
            allowed = _TYPE_NAMES[kind.base]
        raise error(f"{name}: expected {allowed}{' or None' if kind.optional else ''}")


def choice(literal: Any) -> click.Choice:
    """The ``click.Choice`` of a ``Literal[...]`` type (its values, spelled exactly)."""
    return click.Choice([str(c) for c in typing.get_args(literal)])


def _param(f: dataclasses.Field, kind: _Kind) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    meta, required = f.metadata, f.default is MISSING and f.default_factory is MISSING
    default = None if required else f.default
    click_type: Any = None
    if kind.choices:
        click_type = click.Choice([str(c) for c in kind.choices], case_sensitive=not meta.get("case_insensitive"))
    if meta.get("positional"):
        many = kind.base is tuple
        metavar = meta.get("metavar") or f.name.upper() + ("..." if many else "")
        return click.argument(
            f.name, nargs=-1 if many else 1, required=required, metavar=metavar, type=click_type or str
        )
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
    if kind.base is bool:
        decls = [f"{decl}/--no-{decl[2:]}" if default else decl]
        return click.option(*decls, f.name, is_flag=True, default=bool(default), help=meta["help"])
    if kind.base is tuple:
        return click.option(
            decl, f.name, multiple=True, default=default or (), metavar=meta.get("metavar"), help=meta["help"]
        )
    if kind.base not in (int, float, str):
        raise TypeError(f"{f.name}: a {kind.base.__name__} field cannot be a command-line option; exclude it")
    given = {"required": True} if required else {"default": default, "show_default": default is not None}
    return click.option(
        decl, f.name, type=click_type or kind.base, metavar=meta.get("metavar"), help=meta["help"], **given
    )


def click_options(cls: type, exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding one click argument or option per field of ``cls`` (but ``exclude``), in field order.

    A field without ``help`` that is not excluded is an error here, so a new field cannot silently miss its help.
    """
    kinds = _kinds(cls)
    params = []
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


def config_from_params(cls: type, params: dict[str, Any]) -> Any:
    """``cls`` built from click's parsed parameters (their names are the field names; others are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in params.items() if k in names})


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
