"""Rows of the sources that are not JSON text: CSV, Parquet and Arrow files, `datasets` save_to_disk
folders, and hub datasets (`hf:`, `modelscope:`). data/read.py dispatches here; each returns the same
(place, value) pairs as a JSON file, so the formats, column mapping and per-row checks are the same for all.

Parquet, Arrow and saved folders are read with pyarrow and `datasets`; hub datasets with
`datasets.load_dataset` and ModelScope's `MsDataset.load`. CSV is read with the standard library's
csv module rather than `datasets`' CSV builder (pandas), which infers types: a cell `007` would come
back as the number 7 and an empty cell as NaN, where a chat row needs the text as written.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from chatlora.errors import DataError, Problem

HF_PREFIX = "hf:"
MODELSCOPE_PREFIX = "modelscope:"
TABLE_SUFFIXES = (".csv", ".parquet", ".arrow")
# Files save_to_disk writes beside the Arrow shards (a Dataset, or a DatasetDict of them).
SAVED_MARKERS = ("state.json", "dataset_dict.json")


def is_hub(path: str) -> bool:
    return path.startswith((HF_PREFIX, MODELSCOPE_PREFIX))


def is_saved_dataset(folder: Path) -> bool:
    return folder.is_dir() and any((folder / m).is_file() for m in SAVED_MARKERS)


def _fail(path: str, reason: str, where: str = ""):
    raise DataError([Problem(path, where, "", reason)])


def _rows(path: str, values: list[Any], place: str = "index", first: int = 0) -> list[tuple[str, Any]]:
    """(where, value) of each row: `index N` from 0 like a JSON list, or `row N` of a CSV file."""
    if not values:
        _fail(path, "the data holds no rows")
    return [(f"{place} {i}", value) for i, value in enumerate(values, first)]


def read_csv(file: Path, path: str, text: str) -> list[tuple[str, Any]]:
    """CSV rows as objects keyed by the header; each row is `row N` (1 = the first row under the header),
    since a quoted cell may span lines. A row with more cells than the header is reported by row."""
    reader = csv.DictReader(text.splitlines(keepends=True), restkey="\0extra")
    if not reader.fieldnames:
        _fail(path, "the CSV file has no header row (the first row names the columns)")
    values, problems = [], []
    try:
        for number, row in enumerate(reader, 1):
            if "\0extra" in row:
                problems.append(Problem(path, f"row {number}", "", f"{len(reader.fieldnames) + len(row.pop(chr(0) + 'extra'))} "
                                        f"cells, but the header names {len(reader.fieldnames)} columns"))
            values.append({k: v for k, v in row.items() if v is not None})
    except csv.Error as e:
        _fail(path, f"malformed CSV: {e}", f"line {reader.line_num}")
    if problems:
        raise DataError(problems)
    return _rows(path, values, "row", 1)


def read_arrow(file: Path, path: str) -> list[tuple[str, Any]]:
    """A Parquet file, or an Arrow file (IPC stream as `datasets` writes it, or IPC file format)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if file.suffix == ".parquet":
            table = pq.read_table(file)
        else:
            try:
                with pa.memory_map(str(file)) as source:
                    table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                with pa.memory_map(str(file)) as source:
                    table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        _fail(path, f"cannot be read as {file.suffix[1:].capitalize()}: {e}")
    return _rows(path, table.to_pylist())


def read_saved(folder: Path, path: str) -> list[tuple[str, Any]]:
    """A folder written by `Dataset.save_to_disk`; of a DatasetDict, its `train` split."""
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as e:
        _fail(path, f"cannot be loaded as a saved `datasets` folder: {e}")
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            _fail(path, f"a saved DatasetDict without a train split (it has {', '.join(data)}); "
                  "name the split's folder inside it")
        data = data["train"]
    return _rows(path, data.to_list())


def parse_hub(path: str) -> tuple[str, str, str | None, str]:
    """(hub, name, config, split) of `hf:org/name[:config][@split]` or `modelscope:org/name[:subset][@split]`."""
    hub, _, rest = path.partition(":")
    rest, _, split = rest.partition("@")
    name, _, config = rest.partition(":")
    if not name or name.count("/") > 1:
        _fail(path, f"not a hub dataset name; write {hub}:org/name[:config][@split]")
    return hub, name, config or None, split or "train"


def read_hub(path: str) -> list[tuple[str, Any]]:
    """A hub dataset's split, downloaded (or found in the local cache) by its own library.

    Raises DataError in one line naming the source and the cache looked in when it cannot be had
    (offline, unknown name, no such split)."""
    hub, name, config, split = parse_hub(path)
    if hub == "hf":
        import datasets

        cache = datasets.config.HF_DATASETS_CACHE
        try:
            data = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # noqa: BLE001  ConnectionError, DatasetNotFoundError, ValueError (split) and more
            _fail(path, f"cannot be loaded ({_first_line(e)}); looked in the cache {cache} "
                  "(HF_HOME / HF_DATASETS_CACHE); connect once, or copy the dataset there")
        return _rows(path, data.to_list())
    try:
        from modelscope.msdatasets import MsDataset
    except ImportError:
        _fail(path, "ModelScope datasets need the modelscope package: pip install 'chatlora[modelscope]'")
    import os

    cache = os.environ.get("MODELSCOPE_CACHE") or str(Path.home() / ".cache" / "modelscope")
    try:
        data = MsDataset.load(name, subset_name=config, split=split)
        data = data.to_hf_dataset() if hasattr(data, "to_hf_dataset") else data
    except Exception as e:  # noqa: BLE001  network, name and split errors come as many types
        _fail(path, f"cannot be loaded ({_first_line(e)}); looked in the cache {cache} (MODELSCOPE_CACHE)")
    return _rows(path, [dict(row) for row in data])


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
