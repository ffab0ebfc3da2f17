"""Mixing sources (data/mix.py, data/prepare.py: load_sources): weights met within 2% on 10,000 rows,
the same seed giving the same mix, fixed sample counts up and down, duplicates across sources dropped
and counted, per-source system prompt and train_on, the identity set, and the per-source report."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from chatlora.config.schema import DataConfig
from chatlora.config.sources import IdentityConfig, SourceConfig
from chatlora.data.prepare import load_sources
from chatlora.errors import ConfigError
from chatlora.model.tokenized import check_data

from conftest import FIXTURES, tiny_config


def write(path, rows):
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return str(path)


def qa(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "output": f"{prefix} answer {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    return {name: write(folder / f"{name}.jsonl", qa(name, n)) for name, n in (("a", 6000), ("b", 3000), ("c", 1000))}


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (0.2, 0.2, 0.6), (1, 1, 1)])
def test_weights_are_met_within_two_percent_on_ten_thousand_rows(sources, weights):
    entries = [SourceConfig(path=sources[n], weight=w) for n, w in zip("abc", weights)]
    loaded = load_sources(DataConfig(train=entries))
    assert len(loaded.train) == 10_000  # every source weighted: the epoch keeps the rows' total
    shares = Counter(c.group for c in loaded.train)
    for name, weight in zip("abc", weights):
        assert abs(shares[sources[name]] / 10_000 - weight / sum(weights)) < 0.02
    # c (1000 rows) at 0.6 of 10,000: every row 6 times; a at 0.2: a subset, each row at most once.
    counted = Counter(c.messages[0]["content"] for c in loaded.train)
    if weights == (0.2, 0.2, 0.6):
        assert {counted[f"c question {i}"] for i in range(1000)} == {6}
        assert max(counted[f"a question {i}"] for i in range(6000)) == 1


def test_the_same_seed_gives_the_same_mix_and_another_seed_another(sources):
    def mixed(seed):
        entries = [SourceConfig(path=sources["a"], weight=0.25), SourceConfig(path=sources["c"], samples=1500), sources["b"]]
        return [c.messages[0]["content"] for c in load_sources(DataConfig(train=entries, seed=seed)).train]

    first = mixed(7)
    assert first == mixed(7)
    assert first != mixed(8)
    # b as it is (3000), c at 1500 (all 1000 + 500 drawn), a a quarter of the whole: 4500 / 0.75 * 0.25.
    counts = Counter(text.split()[0] for text in first)
    assert counts == {"a": 1500, "b": 3000, "c": 1500}


def test_weights_that_cannot_be_met_are_refused():
    with pytest.raises(ConfigError, match="the weights sum to 1.2, but with sources that have no weight"):
        DataConfig(train=[SourceConfig(path="a.json", weight=0.6), SourceConfig(path="b.json", weight=0.6), "c.json"])
    with pytest.raises(ConfigError, match="give weight or samples, not both"):
        SourceConfig(path="a.json", weight=0.5, samples=3)


def test_duplicates_across_sources_are_dropped_and_counted(tmp_path):
    a = write(tmp_path / "a.jsonl", qa("x", 5) + qa("x", 1))  # a repeat inside one source is kept
    b = write(tmp_path / "b.jsonl", qa("x", 3) + qa("y", 2))
    loaded = load_sources(DataConfig(train=[a, b]))
    assert [(s.rows, s.duplicates, s.samples) for s in loaded.sources] == [(6, 0, 6), (5, 3, 2)]
    assert len(load_sources(DataConfig(train=[a, b], dedup=False)).train) == 11


def test_per_source_system_prompt_and_train_on(tmp_path):
    a = write(tmp_path / "a.jsonl", qa("a", 2))
    b = str(FIXTURES / "openai.jsonl")
    cfg = DataConfig(train=[SourceConfig(path=a, system_prompt="You are a pirate.", train_on="last"), b],
                     system_prompt="Be kind.")
    train = load_sources(cfg).train
    assert {c.messages[0]["content"] for c in train if c.group == a} == {"You are a pirate."}
    assert all(c.train_on == "last" for c in train if c.group == a)
    assert all(c.train_on is None and c.messages[0]["role"] == "system" for c in train if c.group == b)


def test_identity_set_in_both_languages(tmp_path):
    loaded = load_sources(DataConfig(train=[str(FIXTURES / "alpaca.json")],
                                     identity=IdentityConfig(name="Juniper", author="Greenhouse Labs")))
    identity = [c for c in loaded.train if c.group == "identity"]
    assert len(identity) == 20 and loaded.sources[-1].name == "identity"
    replies = [c.messages[-1]["content"] for c in identity]
    assert "I am Juniper, an assistant made by Greenhouse Labs. How can I help you?" in replies
    assert "我是Juniper，由Greenhouse Labs开发的助手。有什么可以帮你的吗？" in replies
    assert not any("{{" in r for r in replies)
    english = load_sources(DataConfig(train=[str(FIXTURES / "alpaca.json")], identity=IdentityConfig(name="J", language="en")))
    assert len(english.train) == 20


def test_the_report_shows_rows_samples_and_tokens_per_source(tiny_model_dir, tmp_path):
    general = write(tmp_path / "general.jsonl", qa("general", 40))
    persona = str(FIXTURES / "alpaca.json")
    cfg = tiny_config(tiny_model_dir, tmp_path, f"data.train=[{{path: {persona}, samples: 20}}, {{path: {general}, weight: 0.5}}]",
                      "data.identity.name=Juniper", "data.identity.language=en", "data.validation=0.1")
    lines: list[str] = []
    checked = check_data(cfg, lines.append, samples=0, color=False)
    text = "\n".join(lines)
    sources = checked.report["sources"]
    # 10 + 40 + 10 rows, 6 held out across them; then persona 20 samples, identity its rows, general half the whole.
    assert sum(s["held_out"] for s in sources) == 6
    persona_count, general_count, identity_count = sources
    assert persona_count["samples"] == 20
    assert general_count["samples"] == persona_count["samples"] + identity_count["samples"]
    assert checked.report["train"]["rows"] == sum(s["samples"] for s in sources) == len(checked.data.train.dataset)
    assert sum(s["tokens"] for s in sources) == checked.report["train"]["tokens"]
    assert f"  {persona}: 10 rows" in text and "-> 20 drawn" in text
    assert f"  {general}: 40 rows" in text and "  identity: 10 rows" in text


def test_a_source_train_on_last_trains_fewer_tokens_of_its_rows_only(tiny_model_dir, tmp_path):
    data = str(FIXTURES / "alpaca.json")  # index 5 holds a history turn: trained with `all`, not with `last`
    def trained(entry: str) -> tuple[int, int]:
        cfg = tiny_config(tiny_model_dir, tmp_path, f"data.train=[{entry}]")
        checked = check_data(cfg, lambda _line: None, samples=0)
        row = checked.data.train.dataset[5]
        return checked.report["train"]["trained_tokens"], sum(1 for t in row["labels"] if t != -100)

    everything, history_row = trained(data)
    last, history_row_last = trained(f"{{path: {data}, train_on: last}}")
    assert history_row_last == len("Mint is happy in partial shade.") + 1  # the last reply and <|im_end|>
    assert history_row - history_row_last == len("Try parsley.") + 1
    assert everything - last == history_row - history_row_last

