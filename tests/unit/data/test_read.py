"""File-level errors of reading data (data/read.py): malformed JSON and JSON lines, invalid UTF-8,
a missing file, a top level that is not a list; every bad line reported at once, with line and column."""

from __future__ import annotations

import pytest

from chatlora.data.read import read_rows
from chatlora.errors import DataError, Problem

from conftest import problems_of


def test_malformed_jsonl_lines_all_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n'
        '{"instruction": "a", "output": }\n'
        '{"instruction": "c", "output": "d"}\n'
        '{bad\n'
        '\n'
        '{"instruction": "e", "output": "f"},\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as e:
        read_rows(str(path))
    assert problems_of(e) == [
        ("line 2", "", "malformed JSON at column 32: Expecting value"),
        ("line 4", "", "malformed JSON at column 2: Expecting property name enclosed in double quotes"),
        ("line 6", "", "malformed JSON at column 36: Extra data"),
    ]
    assert all(p.source == str(path) for p in e.value.problems)
    assert f"{path}:line 2: malformed JSON at column 32" in str(e.value)


def test_malformed_json_reports_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '[\n'
        '  {"instruction": "a", "output": "b"},\n'
        '  {"instruction": "c" "output": "d"}\n'
        ']\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as e:
        read_rows(str(path))
    assert problems_of(e) == [("line 3", "", "malformed JSON at column 23: Expecting ',' delimiter")]


def test_json_file_holding_json_lines_with_a_bad_line_points_at_it(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n'
        '{"instruction": "c", "output": "d"}\n'
        '{"instruction": oops}\n'
        '{"instruction": "e", "output": "f"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as e:
        read_rows(str(path))
    assert [p.where for p in e.value.problems] == ["line 3"]


def test_json_top_level_must_be_a_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"instruction": "a", "output": "b"}', encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_rows(str(path))
    assert problems_of(e) == [("", "", "a .json data file must hold a list of rows, not a JSON object")]


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert e.value.problems == [Problem(path, "", "", "no such file")]


def test_invalid_utf8_lines_all_reported(tmp_path):
    path = tmp_path / "gbk.jsonl"
    path.write_bytes(
        b'{"instruction": "a", "output": "b"}\n'
        b'{"instruction": "\xff\xfe", "output": "b"}\n'
        b'{"instruction": "c", "output": "d"}\n'
        b'{"instruction": "\xc4\xe3\xba\xc3", "output": "e"}\n'
    )
    with pytest.raises(DataError) as e:
        read_rows(str(path))
    assert problems_of(e) == [
        ("line 2", "", "invalid UTF-8 at byte 18 of the line"),
        ("line 4", "", "invalid UTF-8 at byte 18 of the line"),
    ]
    assert "UTF-8" in e.value.hint
    assert f"{path}:line 2" in str(e.value)
