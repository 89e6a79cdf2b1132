"""Config files: a typed config read from YAML (or JSON, which is YAML) and written back as YAML.

The file is one mapping of field names to values. A key is the field's name (``max_len``), the same with dashes
(``max-len``) or the name of its flag (``map`` for ``--map``); positional fields (``shards``, ``datasets``) and
fields without a flag may be given too. The field's type decides how a plain scalar is read, so YAML 1.1's
surprises do not apply: ``checkpointing: off`` is the string ``"off"``, ``model_params: 7e9`` the string
``"7e9"``, ``lr: 2e-4`` the number 0.0002 and ``seed: 010`` the integer 10. A list is a tuple for a
``tuple[str, ...]`` field (a single string is a one-item tuple), an int is accepted for a float field, and
``null`` (or ``~``, or nothing) is None. A quoted scalar is always a string; a number field that also takes
words (``tokens_per_micro_batch: auto``) reads them as those words. A string field that the command line takes as a
comma list (metadata ``comma_list``) also takes a YAML list (``target_modules: [q_proj, v_proj]``), and one that
takes a JSON object (``json_object``) also takes a YAML mapping (``model_overrides: {num_hidden_layers: 2}``), whose
values read as the JSON of their text would (``1e6`` a number, ``010`` the integer 10, ``no`` the string "no").
Relative paths in a file are relative to the working directory, as on the command line.

:func:`read_config_file` returns the values by field name (checked against the field types, before the
config's own checks run); :func:`config_yaml` writes every field of a config, each with its help as a comment,
so that reading the text back gives the same config. Every problem with a file is one :class:`ConfigFileError`
naming the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import os
import re
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .cli_config import field_kinds, field_problem, flag_name

__all__ = ["SAVED_CONFIG_NAME", "ConfigFileError", "config_yaml", "read_config_file", "write_config_file"]

# The name of the resolved config that a run or a shard set keeps, in the folder it wrote.
SAVED_CONFIG_NAME = "config.yaml"

_NULLS = ("", "~", "null", "Null", "NULL")
_LIMIT = 16 << 20  # bytes; a config is a few kilobytes
_INT = re.compile(r"[-+]?[0-9]+")
_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


class ConfigFileError(ValueError):
    """A config file that cannot be read, is not a mapping, names an unknown key or holds a value of a wrong type."""


def _keys(cls: type) -> dict[str, dataclasses.Field]:
    """Every spelling a file may use for a field: its name, with dashes, and its flag's name."""
    out: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        spellings = {f.name, f.name.replace("_", "-")}
        flag = f.metadata.get("flag")
        if flag:
            spellings |= {flag.lstrip("-"), flag.lstrip("-").replace("-", "_")}
        out.update(dict.fromkeys(spellings, f))
    return out


def _generic(node: Any) -> Any:
    """``node`` as PyYAML's safe loader builds it (mappings, and scalars the field type does not decide)."""
    import yaml

    return yaml.SafeLoader("").construct_document(node)


def _text(node: Any) -> Any:
    """A scalar's text (a plain ``null`` is None); anything else as YAML builds it."""
    import yaml

    if isinstance(node, yaml.ScalarNode) and not (node.style is None and node.value in _NULLS):
        return node.value
    return _generic(node)


def _json_value(node: Any) -> Any:
    """A YAML node as the JSON value its text would be (YAML 1.2's core schema): a plain scalar is null, true/false,
    a decimal int (``010`` is 10) or a float (``1e6`` too), else a string; a quoted scalar is a string."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        return {_json_value(key): _json_value(value) for key, value in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_json_value(item) for item in node.value]
    text = node.value
    if node.style is not None:
        return text
    if text in _NULLS:
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return text.lower() == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _value(node: Any, f: dataclasses.Field, cls: type) -> Any:
    """The value of ``node`` read as field ``f``'s type (see the module doc); anything else as YAML builds it."""
    import yaml

    kind = field_kinds(cls)[f.name]
    if not isinstance(node, yaml.ScalarNode):
        if kind.base is tuple and isinstance(node, yaml.SequenceNode):
            return tuple(_text(item) for item in node.value)
        if kind.base is str and f.metadata.get("comma_list") and isinstance(node, yaml.SequenceNode):
            items = [_text(item) for item in node.value]
            if all(isinstance(item, str) and "," not in item for item in items):
                return ",".join(items)
            return items
        if kind.base is str and f.metadata.get("json_object") and isinstance(node, yaml.MappingNode):
            return json.dumps(_json_value(node))
        return _generic(node)
    text, plain = node.value, node.style is None
    if plain and text in _NULLS:
        return None
    if text in kind.words:
        return text
    if kind.base is str:
        if kind.choices and f.metadata.get("case_insensitive"):
            return {str(c).lower(): c for c in kind.choices}.get(text.lower(), text)
        return text
    if kind.base is tuple:
        return (text,)
    if plain and kind.base in (int, float):
        try:
            return kind.base(text)
        except ValueError:
            pass
    return _generic(node)


def _where(path: str | os.PathLike) -> str:
    return f"--config {str(path)!r}"


def read_config_file(cls: type, path: str | os.PathLike) -> dict[str, Any]:
    """The values the YAML file at ``path`` gives to fields of ``cls``, by field name; :class:`ConfigFileError`
    names the file and the problem (unreadable, TOML, not YAML, not a mapping, an unknown or repeated key, a value
    of the wrong type)."""
    import yaml

    where = _where(path)
    file = Path(path).expanduser()
    if file.suffix.lower() == ".toml":  # read as YAML it is "a single value" or "not valid YAML": say what it is
        raise ConfigFileError(
            f"{where} is a TOML file; a config is YAML (or JSON): write 'key: value' lines, e.g. 'seed: 1', in a "
            ".yaml file"
        )
    try:
        if file.is_file() and file.stat().st_size > _LIMIT:
            raise ConfigFileError(f"{where} is larger than {_LIMIT >> 20} MiB; expected a config of a few lines")
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigFileError(f"{where} cannot be read ({error.strerror or error})") from error
    except UnicodeDecodeError as error:
        raise ConfigFileError(f"{where} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        parts = [getattr(error, "context", None), getattr(error, "problem", None)]
        problem = "; ".join(p for p in parts if p) or str(error)
        raise ConfigFileError(f"{where} is not valid YAML: {problem}{at}") from error
    example = "e.g. 'seed: 1' (--help lists the options)"
    if root is None:
        raise ConfigFileError(f"{where} is empty; expected a mapping of option names to values, {example}")
    if not isinstance(root, yaml.MappingNode):
        what = "a list" if isinstance(root, yaml.SequenceNode) else f"the single value {root.value!r}"
        raise ConfigFileError(f"{where} holds {what}; expected a mapping of option names to values, {example}")
    spellings = _keys(cls)
    values: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key_node, value_node in root.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else _generic(key_node)
        f = spellings.get(key) if isinstance(key, str) else None
        if f is None:
            raise ConfigFileError(f"{where}: unknown key {key!r}{_did_you_mean(key, cls)}; valid keys: "
                                  f"{', '.join(x.name for x in dataclasses.fields(cls))} (or with dashes)")  # fmt: skip
        if f.name in spelled:
            raise ConfigFileError(
                f"{where}: {f.name} is given twice (as {spelled[f.name]!r} and {key!r}); keep one of them"
            )
        spelled[f.name] = key
        value = _value(value_node, f, cls)
        problem = field_problem(cls, f, value)
        if problem is not None:
            raise ConfigFileError(f"{where}: {problem}")
        values[f.name] = value
    return values


def _did_you_mean(key: Any, cls: type) -> str:
    if not isinstance(key, str):
        return ""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key.lstrip("-").replace("-", "_"), names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _plain(value: Any) -> Any:
    """``value`` as YAML writes it: tuples as lists, inside mappings too."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@functools.cache
def _dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        """Safe YAML; a string with a line break in double quotes with escapes (``"\\n### Response:\\n"``)."""

    def text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"' if "\n" in value else None)

    Dumper.add_representer(str, text)
    return Dumper


def config_yaml(config: Any, *, header: Iterable[str] = (), reset: Iterable[str] = ()) -> str:
    """Every field of ``config`` as YAML, in field order, each under its help as a comment; ``header`` lines
    first, as comments. Fields named in ``reset`` are written with their default (e.g. ``overwrite``: a replay
    should not replace a folder unless it is asked to). :func:`read_config_file` reads the text back as the same
    values."""
    import yaml

    cls, reset = type(config), set(reset)
    lines = [f"# {line}".rstrip() for line in header]
    for f in dataclasses.fields(cls):
        value = _default(f) if f.name in reset else getattr(config, f.name)
        if lines:
            lines.append("")
        about = f"{flag_name(cls, f)}: {f.metadata['help']}" if "help" in f.metadata else "No command-line option."
        lines += textwrap.wrap(about, 116, initial_indent="# ", subsequent_indent="# ")
        dumped = yaml.dump(
            {f.name: _plain(value)},
            Dumper=_dumper(),
            sort_keys=False,
            allow_unicode=True,
            default_flow_style=False,
            width=1 << 30,
        )
        lines.append(dumped.rstrip("\n"))
    return "\n".join(lines) + "\n"


def write_config_file(
    config: Any, path: str | os.PathLike, *, header: Iterable[str] = (), reset: Iterable[str] = ()
) -> Path:
    """Write :func:`config_yaml` to ``path`` through a temp file and ``os.replace`` (never a half-written file);
    returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config_yaml(config, header=header, reset=reset), encoding="utf-8")
    os.replace(tmp, path)
    return path
