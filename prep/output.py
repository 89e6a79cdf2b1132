"""Where ``prep pack`` writes: the checks on ``--out``, the hidden staging folder, and the final swap.

Nothing is deleted that padless did not write. ``--out`` may be absent, an empty folder, or (with ``--overwrite``)
a padless shard set: a folder holding ``manifest.json`` with format ``padless-shards``, ``shard-NNNNN.arrow``
files, at most an ``eval/`` folder of the same kind and the ``config.yaml`` that ``prep pack`` saves, and nothing
else. It may never be the working directory, an input (a dataset file or folder, the tokenizer folder), a folder
holding an input or the working directory, or a folder inside an input or inside a shard set.

The new set is written into ``.<name>.padless-staging-<pid>-<hex>/new`` next to ``--out`` and swapped into place
only when complete (one atomic exchange where the OS has it, else two renames); the old set is removed after the new
one is in place. ``--out`` is checked again at that moment, since another process may have written there meanwhile:
without ``--overwrite`` the set moves in only while ``--out`` is absent or empty, with it only over a shard set. An
interrupted run (Ctrl-C, SIGTERM) removes its staging folder. A killed run (SIGKILL, a crash) leaves only its staging
folder; the next run into the same ``--out`` removes staging folders whose process is gone (restoring an old set a
crash left moved aside, if ``--out`` is missing) before it checks ``--out``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from padless.shards.config_file import SAVED_CONFIG_NAME
from padless.shards.schema import FORMAT_NAME, MANIFEST_NAME
from padless.shards.writer import rename_into_vacant

from .errors import PrepError

__all__ = [
    "check_out",
    "new_staging",
    "not_a_shard_set",
    "publish",
    "publish_new",
    "remove_stale_staging",
    "staged_output",
]

_SHARD_FILE = re.compile(r"shard-\d{5,}\.arrow")
_STAGING = re.compile(r"\.(?P<name>.+)\.padless-staging-(?P<pid>\d+)-[0-9a-f]{8}")
_MAX_MANIFEST_BYTES = 1 << 30


def not_a_shard_set(folder: Path, nested: bool = False) -> str | None:
    """Why ``folder`` is not a padless shard set, or None when it is one."""
    manifest = folder / MANIFEST_NAME
    if manifest.is_symlink() or not manifest.is_file():
        return f"it has no {MANIFEST_NAME}"
    try:
        if manifest.stat().st_size > _MAX_MANIFEST_BYTES:
            return f"its {MANIFEST_NAME} is larger than a manifest can be"
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"its {MANIFEST_NAME} cannot be read as JSON ({e})"
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        return f"its {MANIFEST_NAME} does not name the format {FORMAT_NAME!r}"
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if name == MANIFEST_NAME:
            continue
        if name == SAVED_CONFIG_NAME and not nested and entry.is_file() and not entry.is_symlink():
            continue
        if _SHARD_FILE.fullmatch(name) and entry.is_file() and not entry.is_symlink():
            continue
        if name == "eval" and not nested and entry.is_dir() and not entry.is_symlink():
            why = not_a_shard_set(entry, nested=True)
            if why is None:
                continue
            return f"its eval/ is not a shard set: {why}"
        return f"it holds {name!r}, which prep pack never writes"
    return None


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_out(out: str, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an ``--out`` that could lose data (see the module doc); ``inputs`` are the local input paths."""
    o = Path(out).expanduser()
    if o.is_symlink():
        raise PrepError(f"--out {out!r} is a symbolic link; give the folder itself (or a new folder) as --out")
    res = o.resolve()
    cwd = Path.cwd().resolve()
    if _is_within(cwd, res):
        what = "is the working directory" if res == cwd else "holds the working directory"
        raise PrepError(f"--out {out!r} {what}; choose a new folder for the shard set, e.g. --out packed")
    for given in inputs:
        p = given.resolve()
        if _is_within(p, res):
            what = "is" if p == res else "holds"
            raise PrepError(
                f"--out {out!r} {what} the input {str(given)!r}; choose a folder that holds none of the inputs"
            )
        if _is_within(res, p):
            raise PrepError(f"--out {out!r} is inside the input {str(given)!r}; choose a folder outside the inputs")
    if res.parent.exists() and not res.parent.is_dir():
        raise PrepError(f"the parent of --out {out!r} is a file; expected a folder path")
    for parent in res.parents:
        if (parent / MANIFEST_NAME).is_file() and not_a_shard_set(parent) is None:
            raise PrepError(
                f"--out {out!r} is inside the shard set {str(parent)!r}; choose a folder outside any shard set"
            )
    if not o.exists():
        return
    if not o.is_dir():
        raise PrepError(f"--out {out!r} is a file; expected a folder path (absent, empty, or a shard set)")
    if not any(o.iterdir()):
        return
    if not overwrite:
        raise PrepError(f"--out {out!r} already exists and is not empty; choose another folder or pass --overwrite")
    why = not_a_shard_set(o)
    if why is not None:
        raise PrepError(
            f"--out {out!r} is not a padless shard set ({why}); --overwrite replaces only a shard set made by "
            "prep pack: choose another --out, or move that folder away yourself"
        )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder named after this process was left by an earlier process with the same id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_staging(out: Path) -> None:
    """Remove the staging folders of dead ``prep pack`` runs into ``out``; restore an old set one left aside."""
    if not out.parent.is_dir():
        return
    for entry in out.parent.iterdir():
        m = _STAGING.fullmatch(entry.name)
        if not m or m.group("name") != out.name or entry.is_symlink() or not entry.is_dir():
            continue
        if _pid_alive(int(m.group("pid"))):
            continue
        old = entry / "old"
        if not out.exists() and not out.is_symlink() and old.is_dir() and not_a_shard_set(old) is None:
            os.rename(old, out)  # a crash between the two renames of publish(): put the previous set back
        shutil.rmtree(entry)


def new_staging(out: Path) -> Path:
    """A new, empty hidden staging folder next to ``out`` (the set itself goes into its ``new`` subfolder)."""
    stage = out.parent / f".{out.name}.padless-staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or filesystem can't."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(stage: Path, out: Path) -> None:
    """Move the complete set ``stage/new`` to ``out``, replacing what is there (``--overwrite``), then remove
    ``stage``.

    At every moment either the old or the new set is at ``out`` (the exchange is atomic; with two renames, a crash
    between them leaves the old set in ``stage/old``, which :func:`remove_stale_staging` puts back). What is at
    ``out`` now is checked again: it may have changed while this run packed, and only a shard set is replaced."""
    new = stage / "new"
    if out.exists() and any(out.iterdir()):
        why = not_a_shard_set(out)
        if why is not None:
            raise PrepError(
                f"--out {str(out)!r} is not a padless shard set ({why}); --overwrite replaces only a shard set made "
                "by prep pack, and it changed while this run packed: nothing was replaced"
            )
    if out.exists():
        if not _exchange(new, out):
            os.rename(out, stage / "old")
            os.rename(new, out)
    else:
        os.rename(new, out)
    with contextlib.suppress(OSError):  # the new set is in place; a leftover is removed by the next run
        shutil.rmtree(stage)


def publish_new(stage: Path, out: Path) -> None:
    """Move the complete set ``stage/new`` to ``out`` only if ``out`` is still absent or an empty folder (without
    ``--overwrite``), then remove ``stage``.

    One rename does both the check and the move, so a set that another run wrote to ``out`` while this one packed
    is never replaced."""
    if not rename_into_vacant(stage / "new", out):
        raise PrepError(
            f"--out {str(out)!r} was filled by another process while this run packed; nothing was replaced: run "
            "again with another --out, or with --overwrite to replace it"
        )
    with contextlib.suppress(OSError):
        shutil.rmtree(stage)


@contextmanager
def staged_output(out: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield the folder to write the new set into; on a clean exit swap it into ``out`` (``overwrite``: replacing
    the shard set there, :func:`publish`; else only into an absent or empty ``out``, :func:`publish_new`).

    On any failure the staging folder and the parent folders this call created go, ``out`` stays as it was, and an
    ``OSError`` (disk full, permission) becomes one :class:`PrepError` that says so."""
    existed = out.exists()
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # innermost first
    stage = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = new_staging(out)
        yield stage / "new"
        (publish if overwrite else publish_new)(stage, out)
    except BaseException as e:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for p in made:
            with contextlib.suppress(OSError):  # only if still empty
                p.rmdir()
        if isinstance(e, OSError):
            kept = "the shard set already there is unchanged" if existed else "nothing was written"
            where = f" ({e.filename})" if e.filename else ""
            raise PrepError(
                f"cannot write the shard set to --out {str(out)!r}: {e.strerror or e}{where}; {kept}"
            ) from e
        raise
