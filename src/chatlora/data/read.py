"""Read data sources into rows, reporting every syntax and encoding problem with its place.

JSON and JSONL are read here; CSV, Parquet, Arrow, saved `datasets` folders and hub datasets in
data/tables.py. `source_files` turns a folder or glob into its files.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from chatlora.data import tables
from chatlora.errors import DataError, Problem

PACKAGE_PREFIX = "chatlora:"


class MalformedLines(DataError):
    """Some lines of a JSONL file are not JSON; `rows` holds the others, so their own problems can be
    reported in the same run."""

    def __init__(self, problems: list[Problem], rows: list["RawRow"]):
        super().__init__(problems)
        self.rows = rows


@dataclass
class RawRow:
    source: str
    where: str
    """`line N` for JSONL, `index N` for a JSON list."""
    value: Any


def resolve_path(path: str) -> Path:
    """A data path; `chatlora:examples/...` points inside the installed package."""
    if path.startswith(PACKAGE_PREFIX):
        return Path(str(resources.files("chatlora").joinpath(path[len(PACKAGE_PREFIX) :])))
    return Path(path).expanduser()


DATA_SUFFIXES = (".json", ".jsonl", *tables.TABLE_SUFFIXES)


def source_files(path: str) -> list[str]:
    """The data files of one source path: the path itself, or the data files (by suffix) of a folder
    (recursively, sorted) or glob. A hub name or a saved `datasets` folder is one source of its own.

    Raises DataError for a folder or glob that holds no data file."""
    if tables.is_hub(path):
        return [path]
    file = resolve_path(path)
    if file.is_dir() and not tables.is_saved_dataset(file):
        found = sorted(str(p) for p in file.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
        if not found:
            _fail(path, f"the folder holds no data file ({', '.join(DATA_SUFFIXES)}) and is not a saved `datasets` folder")
        return found
    if not file.exists() and glob.has_magic(str(file)):
        found = sorted(p for p in glob.glob(str(file), recursive=True) if Path(p).suffix in DATA_SUFFIXES)
        if not found:
            _fail(path, f"no such file, and as a pattern it matches no data file ({', '.join(DATA_SUFFIXES)})")
        return found
    return [path]


def read_rows(path: str) -> list[RawRow]:
    """All rows of one data file or source: a .json (a list of objects) or .jsonl (one object per
    line) file here; CSV, Parquet, Arrow, a saved `datasets` folder or a hub dataset (data/tables.py).

    Raises DataError listing every undecodable line, or the first JSON syntax error of a .json file (a
    JSON document cannot be parsed past it); and for a path that is missing, not a regular file,
    unreadable, empty or without rows. MalformedLines (a DataError) lists every malformed JSONL line,
    with its column, and carries the lines that did parse.
    """
    if tables.is_hub(path):
        return _raw(path, tables.read_hub(path))
    file = resolve_path(path)
    if tables.is_saved_dataset(file):
        return _raw(path, tables.read_saved(file, path))
    if file.suffix in (".parquet", ".arrow") and file.is_file():
        return _raw(path, tables.read_arrow(file, path))
    data = _read_bytes(file, path)
    text = _decode(data, path)
    if not text.strip():
        raise DataError([Problem(path, "", "", "the file is empty")])
    if file.suffix == ".csv":
        return _raw(path, tables.read_csv(file, path, text))
    # By content first: a JSON list saved as .jsonl is read as the list it is (JSONL rows are objects,
    # never lists); a .json file holding JSON Lines is told apart inside _read_json.
    if file.suffix == ".json" or text.lstrip().startswith("["):
        rows = _read_json(text, path)
    else:
        rows = _read_jsonl(text, path)
    if not rows:
        raise DataError([Problem(path, "", "", "the file holds no rows")])
    return rows


def _raw(path: str, rows: list[tuple[str, Any]]) -> list[RawRow]:
    return [RawRow(path, where, value) for where, value in rows]


def _read_bytes(file: Path, path: str) -> bytes:
    if not file.exists():
        return _fail(path, "no such file")
    if file.is_dir():
        return _fail(path, "is a folder, not a data file; name a data file inside it")
    if not file.is_file():
        # A FIFO or device would block or never end; chatlora reads regular files only.
        return _fail(path, "is not a regular file")
    try:
        return file.read_bytes()
    except OSError as e:
        return _fail(path, f"cannot be read: {e.strerror or e}")


def _fail(path: str, reason: str):
    raise DataError([Problem(path, "", "", reason)])


# json recurses once per nesting level and overflows Python's stack; no chat row nests that deep.
TOO_DEEP = "JSON nested too deeply to be a data row (hundreds of levels of [ or {)"


def _read_json(text: str, path: str) -> list[RawRow]:
    try:
        doc = json.loads(text)
    except RecursionError:
        raise DataError([Problem(path, "", "", TOO_DEEP)]) from None
    except json.JSONDecodeError as e:
        # A .json file that is really JSON Lines (a common mix-up) is read as such, so each bad line
        # is reported with its own number rather than as "extra data" after the first line.
        first = next((line for line in jsonl_lines(text) if line.strip()), "")
        if _is_json(first):
            return _read_jsonl(text, path)
        raise DataError([Problem(path, f"line {e.lineno}", "", _syntax(e))]) from None
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise DataError([Problem(path, "", "", f"malformed JSON: {e}")]) from None
    if not isinstance(doc, list):
        raise DataError([Problem(path, "", "", f"a .json data file must hold a list of rows, not a {_json_type(doc)}")])
    return [RawRow(path, f"index {i}", value) for i, value in enumerate(doc)]


def _json_type(value: Any) -> str:
    return {dict: "JSON object", str: "string", list: "list", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _syntax(e: json.JSONDecodeError) -> str:
    if e.msg.startswith("Unexpected UTF-8 BOM"):
        # utf-8-sig drops a BOM at the start of the file only; one further in comes from joining files.
        return "a UTF-8 byte-order mark (BOM) starts this line (were files joined together?); remove it"
    if e.msg.startswith("Unterminated string"):  # Python's message ends in "starting at", the place given apart
        return f"malformed JSON at column {e.colno}: a string starts there and never ends (is the file cut off?)"
    return f"malformed JSON at column {e.colno}: {e.msg}"

def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except (ValueError, RecursionError):  # ValueError: JSONDecodeError, or an integer too long to convert
        return False


def jsonl_lines(text: str) -> list[str]:
    """JSONL lines: split at newlines only. str.splitlines() also splits at U+2028, U+0085 and other
    characters that JSON strings may hold raw (json.dumps(ensure_ascii=False) writes them so)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


# Files that are not text at all, told apart by their first bytes.
SIGNATURES = {
    b"\xff\xfe": "UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8",
    b"\xfe\xff": "UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8",
    b"\x1f\x8b": "gzip-compressed; decompress it first (gunzip)",
    b"PK\x03\x04": "a zip archive; extract the data file from it",
}


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    for magic, what in SIGNATURES.items():
        if data.startswith(magic):
            raise DataError([Problem(path, "", "", f"not UTF-8 JSON: the file is {what}")])
    problems = []
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(path, f"line {number}", "", f"invalid UTF-8 at byte {e.start + 1} of the line"))
    raise DataError(problems, hint="Save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 in.json > out.json`).")


def _read_jsonl(text: str, path: str) -> list[RawRow]:
    rows, problems = [], []
    for number, line in enumerate(jsonl_lines(text), 1):
        if line.strip():
            parsed = _parse_line(line, path, number)
            (rows if isinstance(parsed, RawRow) else problems).append(parsed)
    if problems:
        raise MalformedLines(problems, rows)
    return rows


def _parse_line(line: str, path: str, number: int) -> RawRow | Problem:
    try:
        return RawRow(path, f"line {number}", json.loads(line))
    except json.JSONDecodeError as e:
        return Problem(path, f"line {number}", "", _syntax(e))
    except RecursionError:
        return Problem(path, f"line {number}", "", TOO_DEEP)
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        return Problem(path, f"line {number}", "", f"malformed JSON: {e}")


def iter_rows(path: str) -> Iterator[RawRow | Problem]:
    """The rows of one file one at a time, each bad one a Problem, for data larger than memory
    (data.streaming): a .jsonl file line by line, with read_rows' messages; any other source whole,
    through read_rows (its whole-file problems, such as a missing file, too)."""
    file = resolve_path(path)
    if tables.is_hub(path) or file.suffix != ".jsonl" or not file.is_file():
        try:
            yield from read_rows(path)
        except MalformedLines as e:
            yield from e.problems
            yield from e.rows
        except DataError as e:
            yield from e.problems
        return
    try:
        with file.open("rb") as f:
            for number, data in enumerate(f, 1):  # a binary file splits at b"\n" only, as jsonl_lines does
                data = data.rstrip(b"\n").removesuffix(b"\r")
                if number == 1:
                    data = data.removeprefix(b"\xef\xbb\xbf")
                try:
                    line = data.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield Problem(path, f"line {number}", "", f"invalid UTF-8 at byte {e.start + 1} of the line")
                    continue
                if line.strip():
                    yield _parse_line(line, path, number)
    except OSError as e:
        yield Problem(path, "", "", f"cannot be read: {e.strerror or e}")
