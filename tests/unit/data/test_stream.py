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
