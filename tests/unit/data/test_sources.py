"""Data sources beyond JSON files (data/read.py, data/tables.py): a saved `datasets` folder, Parquet,
Arrow and CSV files, folders and globs, column and role mapping on files with other keys, and the hub
paths offline; every bad row still named by source, row and field."""

from __future__ import annotations

import json

import pytest

from chatlora.config.load import apply_overrides, build
from chatlora.config.schema import Config, DataConfig
from chatlora.config.sources import SourceConfig
from chatlora.data.prepare import load_conversations
from chatlora.errors import ConfigError, DataError

from conftest import FIXTURES, problems_of

ALPACA = json.loads((FIXTURES / "alpaca.json").read_text())
QA = [{"question": r["instruction"], "answer": r["output"], "id": i, "output": "not this"} for i, r in enumerate(ALPACA)]


def train(*entries, **settings):
    return load_conversations(DataConfig(train=list(entries), **settings))[0]


def test_a_saved_datasets_folder_and_its_train_split(tmp_path):
    import datasets

    data = datasets.Dataset.from_list(ALPACA)
    data.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": data, "test": data.select([0])}).save_to_disk(str(tmp_path / "dict"))
    one = train(str(tmp_path / "saved"))
    assert [c.messages[-1]["content"] for c in one] == [r["output"] for r in ALPACA]
    assert one[0].where == "index 0" and one[0].source == str(tmp_path / "saved")
    assert len(train(str(tmp_path / "dict"))) == 10
    datasets.DatasetDict({"test": data}).save_to_disk(str(tmp_path / "no-train"))
    with pytest.raises(DataError, match="without a train split \\(it has test\\)"):
        train(str(tmp_path / "no-train"))


def test_parquet_and_arrow_rows_are_checked_by_index(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [*ALPACA[:3], {"instruction": "q", "input": "", "output": ""}]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "rows.parquet")
    with pa.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    for name in ("rows.parquet", "rows.arrow"):
        with pytest.raises(DataError) as e:
            train(str(tmp_path / name))
        assert problems_of(e) == [("index 3", "output", "empty reply")]
        assert e.value.problems[0].source == str(tmp_path / name)
    pq.write_table(pa.Table.from_pylist(ALPACA), tmp_path / "good.parquet")
    assert len(train(str(tmp_path / "good.parquet"))) == 10
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cannot be read as Parquet"):
        train(str(tmp_path / "broken.parquet"))


def test_csv_with_a_column_mapping_on_a_file_with_other_keys(tmp_path):
    import csv

    path = tmp_path / "qa.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "question", "answer", "output"])
        writer.writeheader()
        writer.writerows(QA[:3] + [{"id": 3, "question": "007", "answer": "", "output": "x"}])
        writer.writerow({"id": 4, "question": "line one\nline two", "answer": "two lines", "output": "x"})
    source = SourceConfig(path=str(path), columns={"instruction": "question", "output": "answer"})
    with pytest.raises(DataError) as e:
        train(source)
    # The row is counted under the header (a quoted cell spans lines), the field named as the file has it.
    assert problems_of(e) == [("row 4", "answer", "empty reply")]
    path.write_text(path.read_text().replace('007,,x', '007,"Double-O-Seven, text kept as written",x'))
    rows = train(source)
    assert [c.messages for c in rows[3:]] == [
        [{"role": "user", "content": "007"}, {"role": "assistant", "content": "Double-O-Seven, text kept as written"}],
        [{"role": "user", "content": "line one\nline two"}, {"role": "assistant", "content": "two lines"}]]
    assert rows[0].messages[-1]["content"] == ALPACA[0]["output"]  # `answer`, not the file's own `output`


def test_column_mapping_in_yaml_on_a_json_file(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(QA))
    raw = {"data": {"train": [{"path": str(path), "columns": {"instruction": "question", "output": "answer"}, "weight": 0.5},
                              str(FIXTURES / "openai.jsonl")]}}
    cfg = build(Config, raw, "")
    assert isinstance(cfg.data.train[0], SourceConfig) and cfg.data.train[1] == str(FIXTURES / "openai.jsonl")
    mixed = load_conversations(cfg.data)[0]  # weight 0.5 beside the 3 rows of openai.jsonl: 3 of the 10
    assert [c.group for c in mixed] == [str(path)] * 3 + [str(FIXTURES / "openai.jsonl")] * 3
    with pytest.raises(ConfigError, match="unknown config key 'data.train\\[0\\].colums'; did you mean 'data.train\\[0\\].columns'"):
        build(Config, apply_overrides({}, [f"data.train=[{{path: {path}, colums: {{}}}}]"]), "")
    with pytest.raises(ConfigError, match="columns.question is not a row key"):
        SourceConfig(path="x.json", columns={"question": "instruction"})


def test_a_conversation_file_with_its_own_keys_and_role_names(tmp_path):
    path = tmp_path / "dialog.jsonl"
    rows = [{"dialog": [{"speaker": "customer", "text": "Hi"}, {"speaker": "agent", "text": "Hello!"}]},
            {"dialog": [{"speaker": "customer", "text": "Bye"}, {"speaker": "robot", "text": "Ciao"}]},
            {"dialog": [{"speaker": "customer", "text": "Ok"}, {"speaker": "agent", "text": ""}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    source = SourceConfig(path=str(path), columns={"messages": "dialog", "role": "speaker", "content": "text"},
                          roles={"user": "customer", "assistant": "agent"})
    with pytest.raises(DataError) as e:
        train(source)
    assert problems_of(e) == [
        ("line 2", "dialog[1].speaker", "unknown role 'robot'; expected one of assistant, system, user"),
        ("line 3", "dialog[1]", "empty reply")]
    path.write_text("\n".join(json.dumps(r) for r in rows[:1]))
    assert train(source)[0].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_a_folder_and_a_glob_of_files(tmp_path):
    folder = tmp_path / "parts"
    (folder / "more").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps(ALPACA[:4]))
    (folder / "more" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ALPACA[4:]))
    (folder / "notes.txt").write_text("not data")
    rows = train(str(folder))
    assert len(rows) == 10 and {c.group for c in rows} == {str(folder)}
    assert {c.source for c in rows} == {str(folder / "a.json"), str(folder / "more" / "b.jsonl")}
    assert len(train(str(folder / "*.json"))) == 4
    assert len(train(str(folder / "**" / "*.json*"))) == 10
    with pytest.raises(DataError, match="no such file, and as a pattern it matches no data file"):
        train(str(folder / "*.csv"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder holds no data file"):
        train(str(tmp_path / "empty"))


def test_hub_dataset_offline_fails_in_one_line_naming_source_and_cache(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    with pytest.raises(DataError) as e:
        train("hf:someone/general-chat:default@train")
    (problem,) = e.value.problems
    assert problem.source == "hf:someone/general-chat:default@train"
    assert "cannot be loaded (ConnectionError" in problem.reason and str(tmp_path / "hf-cache") in problem.reason
    assert "\n" not in problem.reason
    with pytest.raises(DataError, match="not a hub dataset name"):
        train("hf:a/b/c")


def test_modelscope_without_its_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "modelscope", None)  # absent, even where it is installed
    with pytest.raises(DataError, match=r"modelscope:org/set: ModelScope datasets need the modelscope package: "
                                        r"pip install 'chatlora\[modelscope\]'"):
        train("modelscope:org/set")


def test_the_mix_demo_mixes_the_general_set_one_to_one():
    """The mix-demo preset (docs/data.md): the pirate rows under Captain Bess's system prompt, and as
    many samples of the shipped general set per epoch, each under its own (SmolLM2's) system prompt."""
    from chatlora.config import load_config

    cfg = load_config("mix-demo")
    train = load_conversations(cfg.data)[0]
    pirate = [c for c in train if "pirate" in c.source]
    general = [c for c in train if "general" in c.source]
    assert len(pirate) == 180 and len(general) == 180
    assert all(c.messages[0]["content"] == cfg.data.system_prompt for c in pirate)
    assert all(c.messages[0]["content"].startswith("You are a helpful AI assistant named SmolLM") for c in general)
