"""Read JSON / JSONL files into rows, reporting every syntax and encoding problem with its place."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from chatlora.errors import DataError, Problem

PACKAGE_PREFIX = "chatlora:"


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


def read_rows(path: str) -> list[RawRow]:
    """All rows of a .json (a list of objects) or .jsonl (one object per line) file.

    Raises DataError listing every undecodable line, or every malformed JSONL line (with its column),
    or the first JSON syntax error of a .json file (a JSON document cannot be parsed past it).
    """
    file = resolve_path(path)
    if not file.is_file():
        raise DataError([Problem(path, "", "", "no such file")])
    data = file.read_bytes()
    text = _decode(data, path)
    if file.suffix == ".jsonl" or (file.suffix != ".json" and not text.lstrip().startswith("[")):
        return _read_jsonl(text, path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file that is really JSON Lines (a common mix-up) is read as such, so each bad line
        # is reported with its own number rather than as "extra data" after the first line.
        first = next((line for line in text.splitlines() if line.strip()), "")
        if _is_json(first):
            return _read_jsonl(text, path)
        raise DataError([Problem(path, f"line {e.lineno}", "", f"malformed JSON at column {e.colno}: {e.msg}")]) from None
    if not isinstance(doc, list):
        raise DataError([Problem(path, "", "", f"a .json data file must hold a list of rows, not a {type(doc).__name__}")])
    return [RawRow(path, f"index {i}", value) for i, value in enumerate(doc)]


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    problems = []
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(path, f"line {number}", "", f"invalid UTF-8 at byte {e.start + 1} of the line"))
    raise DataError(problems, hint="Save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 in.json > out.json`).")


def _read_jsonl(text: str, path: str) -> list[RawRow]:
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(RawRow(path, f"line {number}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(Problem(path, f"line {number}", "", f"malformed JSON at column {e.colno}: {e.msg}"))
    if problems:
        raise DataError(problems)
    return rows
