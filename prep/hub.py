"""What ``datasets`` decides for ``prep``: the files of a Hub-style folder's subset and split, and rows streamed
through ``datasets`` (Hub ids, and folders whose files padless does not read itself).

``datasets`` is imported here only, inside the functions, so ``prep --help`` and packing a plain file never pay for
it. Its errors (an unknown subset or split, no data files, no access) become one :class:`PrepError` that names the
dataset argument.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PrepError

if TYPE_CHECKING:
    from .load import DatasetSpec

__all__ = ["folder_files", "stream_dataset"]

# Builder config fields that name or describe the data, or tune only speed: any other field set away from its
# default (a CSV `sep`, a JSON `field`, Parquet `columns` or `filters`, an `encoding`, ...) changes the rows read.
_NOT_READ_OPTIONS = frozenset({"name", "version", "data_dir", "data_files", "description", "features", "use_threads",
                               "block_size", "chunksize", "batch_size", "memory_map", "verbose", "engine"})  # fmt: skip
# What `datasets` raises for a dataset it cannot find, open or split as asked (no bare Exception).
_DATASETS_ERRORS = (OSError, ValueError, RuntimeError, ImportError, ConnectionError)


def _split_of(spec: DatasetSpec, splits: list[str]) -> str:
    split = spec.split or "train"
    if split not in splits:
        base = spec.text.rsplit("@", 1)[0] if spec.split else spec.text
        raise PrepError(
            f"dataset {spec.text!r} has no split {split!r}; its splits: {', '.join(splits)} (name one as {base}@SPLIT)"
        )
    return split


def _open_error(name: str, spec: DatasetSpec, error: Exception, verb: str) -> PrepError:
    """One PrepError for what `datasets` raised; a dataset of several subsets named without one lists them."""
    if spec.subset is None and "Config name is missing" in str(error):
        import datasets

        try:
            subsets = datasets.get_dataset_config_names(name)
        except _DATASETS_ERRORS:
            subsets = []
        base, _, split = spec.text.partition("@")
        example = f"{base}:SUBSET" + (f"@{split}" if split else "")
        return PrepError(
            f"dataset {spec.text!r} has several subsets: {', '.join(subsets) or '(see its README)'}; name one as "
            f"{example}"
        )
    return PrepError(f"cannot {verb} dataset {spec.text!r} with `datasets`: {error}")


def _reads_as_stored(config: Any) -> bool:
    """Whether a builder ``config`` reads its files with its type's default options, as padless's own readers do
    (a README's ``configs`` entry may set reader options such as ``sep: ";"`` or ``field: data``)."""
    import dataclasses

    default = type(config)()
    for f in dataclasses.fields(config):
        value, usual = getattr(config, f.name), getattr(default, f.name)
        if f.name not in _NOT_READ_OPTIONS and not (value is usual or (type(value) is type(usual) and value == usual)):
            return False
    return True


def folder_files(folder: Path, spec: DatasetSpec) -> list[Path] | None:
    """The data files of ``spec``'s subset and split in a folder laid out as a Hub dataset repository, as
    ``datasets.load_dataset(folder, subset, split=split)`` would read them (in its order); None for a folder whose
    builder names no data files (a dataset script, where the installed ``datasets`` still runs them) or reads them
    with options of its README configuration (a CSV ``sep``, a JSON ``field``, ...): only ``datasets`` applies
    those."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(folder), spec.subset)
    except FileNotFoundError as e:  # datasets' EmptyDatasetError and DataFilesNotFoundError
        raise PrepError(
            f"folder {str(folder)!r} holds no data files ({e}); expected data files (JSON, JSONL, Parquet, CSV, "
            "Arrow, ...) or a save_to_disk folder"
        ) from e
    except _DATASETS_ERRORS as e:  # e.g. "BuilderConfig 'x' not found. Available: [...]"
        raise _open_error(str(folder), spec, e, "open") from e
    data_files = builder.config.data_files
    if not data_files or not _reads_as_stored(builder.config):
        return None
    files = {str(k): v for k, v in data_files.items()}
    split = _split_of(spec, list(files))
    _refuse_left_out(folder, spec, split, files[split])
    return [Path(f) for f in files[split]]


def _refuse_left_out(folder: Path, spec: DatasetSpec, split: str, files: list[str]) -> None:
    """Refuse a folder without README ``configs`` whose ``split`` holds data files of several types: ``datasets``
    reads only the files of its most common type (``a.jsonl`` beside ``b.parquet`` and ``c.parquet`` is left out),
    so part of the data would be dropped without a word. A README that lists the files decides alone."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    from .load import readable

    readme = folder / "README.md"
    try:
        if readme.is_file() and MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data):
            return
        every = DataFilesDict.from_local_or_remote(get_data_patterns(str(folder)), base_path=str(folder))
    except (*_DATASETS_ERRORS, KeyError, TypeError):  # no listing to compare with: datasets' choice stands
        return
    chosen = {str(Path(f).resolve()) for f in files}
    left = [f for f in every.get(split, []) if readable(Path(f)) and str(Path(f).resolve()) not in chosen]
    if left:
        names = [os.path.relpath(f, folder.absolute()) for f in left[:5]] + ["..."] * (len(left) > 5)
        kept = Path(files[0]).suffixes[-2:] if files[0].lower().endswith(".gz") else [Path(files[0]).suffix]
        raise PrepError(
            f"folder {spec.text!r} mixes data file types in its {split!r} split: `datasets` reads only its "
            f"{''.join(kept)} files and would leave out {len(left)} file(s) ({', '.join(names)}); give the "
            "files (or a folder per type) as separate datasets, or list them under `configs` in a README.md"
        )


def stream_dataset(name: str, spec: DatasetSpec, chunk_rows: int, digest: Any) -> Iterator[list[dict[str, Any]]]:
    """Rows of ``name`` (a Hub id or a local folder) streamed by ``datasets`` in chunks; ``digest`` (a hashlib
    object) takes every row's content, so the source's fingerprint covers what was read."""
    import datasets

    try:
        ds = datasets.load_dataset(name, spec.subset, split=spec.split or "train", streaming=True)
        for batch in ds.iter(batch_size=chunk_rows):
            columns = list(batch)
            rows = [dict(zip(columns, values)) for values in zip(*batch.values())]
            for r in rows:
                digest.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
            yield rows
    except _DATASETS_ERRORS as e:
        raise _open_error(name, spec, e, "load") from e
