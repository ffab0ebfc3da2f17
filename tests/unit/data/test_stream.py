"""Streamed training data (data.streaming, data/stream.py): the same samples as the in-memory path,
cached for a resume, bad rows named by line (the first 20, the rest counted), and the sizes of
tokenized samples read by Arrow chunks (data/preflight.py: sample_sizes) as the report and plan do."""

from __future__ import annotations

import json
import random

import pytest

from chatlora.config.schema import DataConfig
from chatlora.config.sources import SourceConfig
from chatlora.data.preflight import sample_sizes
from chatlora.errors import ConfigError, DataError
from chatlora.model.tokenized import check_data

from conftest import tiny_config


def write(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return str(path)


def qa(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "output": f"{prefix} answer {i}"} for i in range(n)]


def test_streamed_data_gives_the_in_memory_samples_and_bounded_problems(tiny_model_dir, tmp_path):
    data = write(tmp_path / "big.jsonl", qa("s", 60))
    memory = check_data(tiny_config(tiny_model_dir, tmp_path, data=data), lambda _line: None, samples=0)
    lines: list[str] = []
    streamed = check_data(tiny_config(tiny_model_dir, tmp_path, "data.streaming=true", data=data), lines.append, samples=1)
    for column in ("input_ids", "labels", "origin"):
        assert streamed.data.train.dataset[column] == memory.data.train.dataset[column]
    assert streamed.report["train"] == memory.report["train"] and "data: 60 training rows streamed" in lines
    again = check_data(tiny_config(tiny_model_dir, tmp_path, "data.streaming=true", data=data), lambda _line: None)
    assert again.data.train.cached and again.data.train.key == streamed.data.train.key  # a resume finds the same samples
    # 30 bad rows: the first 20 named by line, the rest counted.
    rows = [json.dumps(r) for r in qa("b", 40)]
    for i in range(0, 40, 4):
        rows[i] = '{"instruction": "x", "output": }'
        rows[i + 1] = json.dumps({"instruction": "x", "output": ""})
        rows[i + 2] = json.dumps({"instruction": "x"})
    (tmp_path / "bad.jsonl").write_text("\n".join(rows))
    cfg = tiny_config(tiny_model_dir, tmp_path, "data.streaming=true", data=str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError) as e:
        check_data(cfg, lambda _line: None)
    assert len(e.value.problems) == 20 and e.value.more == 10
    assert [(p.where, p.field) for p in e.value.problems[:3]] == [("line 1", ""), ("line 2", "output"), ("line 3", "output")]
    assert "the data has 30 problems:" in str(e.value) and "... and 10 more" in str(e.value)
    with pytest.raises(ConfigError, match="data.streaming reads the sources once"):
        DataConfig(train=[SourceConfig(path=data, weight=0.5), data], streaming=True)


def test_worker_processes_give_the_same_samples_and_problems_in_order(tiny_model_dir, tmp_path):
    """data.num_proc=2 (data/fitting.py): the same samples, report and problems, in file order, as one
    process, streamed and in memory; problems found while reading and while fitting interleave."""
    good = write(tmp_path / "good.jsonl", qa("g", 300) + [{"instruction": "long " * 300, "output": "a " * 200}])
    for streaming in ("false", "true"):
        got = [check_data(tiny_config(tiny_model_dir, tmp_path, f"data.streaming={streaming}", f"data.num_proc={n}",
                                      "data.max_length=128", data=good), lambda _line: None) for n in (1, 2)]
        for column in ("input_ids", "labels", "row", "origin"):
            assert got[0].data.train.dataset[column] == got[1].data.train.dataset[column]
        assert got[0].report["train"] == got[1].report["train"] and got[0].report["train"]["rows"] == 301
    rows = [json.dumps(r) for r in qa("b", 600)]
    for i in range(3, 600, 50):
        rows[i] = '{"instruction": "x", "output": }'  # unreadable: found by the reader
        rows[i + 1] = json.dumps({"instruction": "x", "output": "y " * 300})  # too long: found by fitting
    (tmp_path / "bad.jsonl").write_text("\n".join(rows))
    # In memory every line is read before any is fitted: that file stops at its unreadable lines, so
    # the in-memory path gets a file of too-long rows only.
    (tmp_path / "long.jsonl").write_text("\n".join(r for r in rows if not r.endswith(": }")))
    for streaming, data in (("true", "bad.jsonl"), ("false", "long.jsonl")):
        found = []
        for n in (1, 2):
            cfg = tiny_config(tiny_model_dir, tmp_path, f"data.streaming={streaming}", f"data.num_proc={n}",
                              "data.max_length=128", "data.overlong=error", data=str(tmp_path / data))
            with pytest.raises(DataError) as e:
                check_data(cfg, lambda _line: None)
            found.append([(p.where, p.reason) for p in e.value.problems])
        assert found[0] == found[1]
        if streaming == "true":  # both kinds, in the file's order: the first 20 named
            assert len(found[0]) == 20 and found[0][0] == ("line 4", "malformed JSON at column 32: Expecting value")
            assert found[0][1][0] == "line 5" and "max_length" in found[0][1][1]
        else:
            assert len(found[0]) == 12 and all("max_length" in reason for _, reason in found[0])
    with pytest.raises(ConfigError, match="data.num_proc"):
        DataConfig(train=[good], num_proc=0)


def test_sample_sizes_by_chunks_equal_python_counts():
    import datasets
    import pyarrow as pa

    rng = random.Random(0)
    rows = [[rng.choice([-100, 1, 2]) for _ in range(rng.randint(0, 6))] for _ in range(500)]
    column = pa.array(rows, type=pa.list_(pa.int64()))
    chunks = pa.chunked_array([column.slice(0, 100), column.slice(100, 1), column.slice(101, 0), column.slice(101, 399)])
    lengths, trained = sample_sizes(datasets.Dataset(pa.table({"input_ids": chunks, "labels": chunks})))
    assert lengths == [len(r) for r in rows]
    assert trained == [sum(1 for t in r if t != -100) for r in rows]
