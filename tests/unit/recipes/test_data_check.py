"""`chatlora data check` through the CLI's entry, in this process: bad rows all reported with file,
line and field, exit 2, nothing written; good data summarised (the tiny model's tokenizer)."""

from __future__ import annotations

from pathlib import Path

import yaml

from chatlora.cli import main

from conftest import FIXTURES

ALPACA = str(FIXTURES / "alpaca.json")


def write_config(tmp_path: Path, model_dir: Path, train: str) -> Path:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": str(model_dir)},
        "data": {"train": train, "max_length": 128},
        "output_dir": str(tmp_path / "run"),
    }), encoding="utf-8")
    return path


def test_cli_data_check_on_bad_data(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "ok", "output": "fine"}\n'
        '{"instruction": "no reply"}\n'
        '{"instruction": "ok", "output": "fine"}\n'
        '{"instruction": 7, "output": "x"}\n'
        '{"instruction": "empty", "output": ""}\n',
        encoding="utf-8",
    )
    config = write_config(tmp_path, tiny_model_dir, str(bad))
    assert main(["data", "check", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error:")
    assert "the data has 3 problems" in captured.err
    for line, field in ((2, "output"), (4, "instruction"), (5, "output")):
        assert f"{bad}:line {line} [{field}]" in captured.err
    assert f"{bad}:line 1" not in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "check.yaml"]


def test_cli_data_check_on_malformed_jsonl(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"messages": [}\n{"messages": []}\n{oops\n', encoding="utf-8")
    config = write_config(tmp_path, tiny_model_dir, str(bad))
    assert main(["data", "check", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:")
    assert f"{bad}:line 1: malformed JSON at column" in err
    assert f"{bad}:line 3: malformed JSON at column" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_data_check_on_good_data(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, tiny_model_dir, ALPACA)
    assert main(["data", "check", str(config), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert f"data: {ALPACA} (alpaca)" in out
    assert "train: 10 rows" in out
    assert "pre-flight: ok" in out
    assert not (tmp_path / "run").exists()
