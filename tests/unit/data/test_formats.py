"""Reading JSON / JSONL data, detecting its format, converting rows to conversations, and reporting
every bad row at once. No model weights are loaded; `chatlora data check` on such files:
unit/recipes/test_data_check.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatlora.config.schema import DataConfig
from chatlora.data.formats import EXPECTED, detect_format, to_conversations
from chatlora.data.prepare import load_conversations, read_conversations
from chatlora.data.read import read_rows
from chatlora.errors import DataError

from conftest import FIXTURES, problems_of

ALPACA = str(FIXTURES / "alpaca.json")
SHAREGPT = str(FIXTURES / "sharegpt.json")
OPENAI = str(FIXTURES / "openai.jsonl")


def convert(path: str, system_prompt: str | None = None, fmt: str | None = None):
    rows = read_rows(path)
    return to_conversations(rows, fmt or detect_format(rows, path), system_prompt)


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# ---------------------------------------------------------------- detection and conversion


@pytest.mark.parametrize("path, fmt", [(ALPACA, "alpaca"), (SHAREGPT, "sharegpt"), (OPENAI, "openai")])
def test_format_is_detected(path, fmt):
    assert detect_format(read_rows(path), path) == fmt


def test_alpaca_conversion():
    convs = convert(ALPACA)
    assert len(convs) == 10
    assert convs[0].messages == [user("Who are you?"), assistant("I am Juniper, the greenhouse robot.")]
    assert (convs[0].source, convs[0].where) == (ALPACA, "index 0")
    # instruction + "\n" + input when the input is not empty
    assert convs[2].messages == [user("Translate to French:\ngood morning"), assistant("Bonjour.")]
    assert convs[7].messages[0] == user("Sum these numbers:\n2 3 4")
    # history turns come first
    assert convs[5].messages == [
        user("Name a herb."), assistant("Try parsley."),
        user("And one for shade?"), assistant("Mint is happy in partial shade."),
    ]
    # a row's own system message leads
    assert convs[6].messages == [
        system("You are Juniper, a cheerful greenhouse robot."),
        user("Why are leaves green?"), assistant("Chlorophyll reflects green light."),
    ]


def test_sharegpt_conversion():
    convs = convert(SHAREGPT)
    assert [c.where for c in convs] == ["index 0", "index 1", "index 2"]
    assert convs[0].messages == [user("Hello!"), assistant("Hello, gardener.")]
    assert convs[1].messages == [
        system("You are Juniper."),
        user("Who are you?"), assistant("Juniper, at your service."),
        user("What do you do?"), assistant("I water the plants."),
    ]
    # from: system/user/assistant are accepted as well as human/gpt
    assert convs[2].messages == [system("Be brief."), user("Best soil?"), assistant("Loam.")]


def test_openai_conversion_joins_text_parts():
    convs = convert(OPENAI)
    assert [c.where for c in convs] == ["line 1", "line 2", "line 3"]
    assert convs[0].messages == [user("Hi"), assistant("Hello there.")]
    assert convs[1].messages[0] == system("You are Juniper.")
    assert len(convs[1].messages) == 5
    assert convs[2].messages == [user("Parts work"), assistant("Yes they do.")]


def test_no_internal_fields_leak_into_messages():
    for path in (ALPACA, SHAREGPT, OPENAI):
        for conv in convert(path):
            for m in conv.messages:
                assert set(m) == {"role", "content"}


def test_json_file_holding_json_lines_is_read(tmp_path):
    path = tmp_path / "really_lines.json"
    path.write_text(
        '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d", "output": "e"}\n', encoding="utf-8"
    )
    rows = read_rows(str(path))
    assert [r.where for r in rows] == ["line 1", "line 3"]
    convs = convert(str(path))
    assert convs[1].messages == [user("c\nd"), assistant("e")]


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"instruction": "q", "output": "a"}).encode() + b"\n")
    assert convert(str(path))[0].messages == [user("q"), assistant("a")]


def test_system_prompt_only_for_rows_without_one():
    sp = "现在你要扮演皇帝身边的女人--甄嬛"
    alpaca = convert(ALPACA, system_prompt=sp)
    assert alpaca[0].messages[0] == system(sp)
    assert alpaca[0].messages[1:] == [user("Who are you?"), assistant("I am Juniper, the greenhouse robot.")]
    assert alpaca[6].messages[0] == system("You are Juniper, a cheerful greenhouse robot.")
    assert sum(m["role"] == "system" for c in alpaca for m in c.messages) == 10  # one per row, never two

    sharegpt = convert(SHAREGPT, system_prompt=sp)
    assert [c.messages[0]["content"] for c in sharegpt] == [sp, "You are Juniper.", "Be brief."]

    openai = convert(OPENAI, system_prompt=sp)
    assert [c.messages[0]["content"] for c in openai] == [sp, "You are Juniper.", sp]


def test_system_prompt_through_load_conversations():
    train, val, formats = load_conversations(DataConfig(train=[OPENAI], system_prompt="Be kind."))
    assert formats == {OPENAI: "openai"}
    assert val == []
    assert [c.messages[0] for c in train] == [system("Be kind."), system("You are Juniper."), system("Be kind.")]


# ---------------------------------------------------------------- no known format


def test_unknown_format_lists_keys_and_expected_formats(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "r", "answer": "b", "id": 3}])
    rows = read_rows(path)
    with pytest.raises(DataError) as e:
        detect_format(rows, path)
    assert len(e.value.problems) == 1
    reason = e.value.problems[0].reason
    assert "fit no known format" in reason
    assert "question" in reason and "answer" in reason and "id" in reason
    msg = str(e.value)
    assert EXPECTED in msg
    for fmt, key in (("alpaca", "instruction"), ("sharegpt", "conversations"), ("openai", "messages")):
        assert fmt in msg and key in msg


def test_no_object_rows_at_all(tmp_path):
    path = tmp_path / "lists.json"
    path.write_text("[[1, 2], \"x\"]", encoding="utf-8")
    with pytest.raises(DataError, match="no object rows at all"):
        detect_format(read_rows(str(path)), str(path))


def test_unknown_format_via_load_conversations_lists_keys(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError) as e:
        load_conversations(DataConfig(train=[path]))
    assert "keys seen: prompt, completion" in str(e.value)


def test_unknown_format_via_load_conversations_lists_expected_formats(tmp_path):
    path = jsonl(tmp_path / "qa.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError) as e:
        load_conversations(DataConfig(train=[path]))
    assert EXPECTED in str(e.value)


# ---------------------------------------------------------------- row-level errors, all at once


def test_every_bad_openai_row_reported_at_once(tmp_path):
    path = jsonl(tmp_path / "bad.jsonl", [
        {"messages": [user("fine"), assistant("fine")]},                                    # 1 ok
        {"messages": [user("a"), user("b"), assistant("c")]},                                # 2 user, user
        {"messages": [user("a"), assistant("b"), system("late"), user("c"), assistant("d")]},  # 3 late system
        {"messages": [user("a"), assistant("b"), user("c")]},                                # 4 ends with user
        {"messages": [{"role": "bot", "content": "a"}, assistant("b")]},                     # 5 unknown role
        ["not", "an", "object"],                                                             # 6
        {"messages": [{"role": "user"}, {"role": "assistant", "content": 5}]},               # 7 missing, non-str
        {"messages": []},                                                                    # 8 empty list
        {"messages": [user("q"), assistant("   ")]},                                         # 9 empty reply
        {"messages": [{"content": "q"}, assistant("a")]},                                    # 10 missing role
        {"messages": [user("q"), assistant("a")]},                                           # 11 ok
    ])
    rows = read_rows(path)
    assert detect_format(rows, path) == "openai"
    with pytest.raises(DataError) as e:
        to_conversations(rows, "openai")
    assert problems_of(e) == [
        ("line 2", "messages[1].role", "roles out of order: expected 'assistant', got 'user'"),
        ("line 3", "messages[2].role", "roles out of order: expected 'user', got a system message after the first turn"),
        ("line 4", "", "the conversation must end with an assistant reply"),
        ("line 5", "messages[0].role", "unknown role 'bot'; expected one of assistant, system, user"),
        ("line 6", "", "a row must be a JSON object, got list"),
        ("line 7", "messages[0].content", "missing"),
        ("line 7", "messages[1].content", "must be a string, got int"),
        ("line 8", "messages", "must be a non-empty list"),
        ("line 9", "messages[1]", "empty reply"),
        ("line 10", "messages[0].role", "missing"),
    ]
    assert len(e.value.problems) == 10
    assert all(p.source == path for p in e.value.problems)
    msg = str(e.value)
    assert msg.startswith("the data has 10 problems:")
    assert f"{path}:line 2 [messages[1].role]: roles out of order" in msg
    assert "Rows were read as openai" in msg


def test_every_bad_alpaca_row_reported_at_once(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([
        {"instruction": "fine", "output": "fine"},                                 # 0 ok
        {"instruction": "a"},                                                      # 1 missing output
        {"instruction": 5, "output": "x"},                                         # 2 non-string
        {"instruction": "a", "output": "  "},                                      # 3 empty output
        {"instruction": "", "input": "", "output": "x"},                           # 4 empty prompt
        {"instruction": "a", "output": "b", "history": [["q"]]},                   # 5 bad history pair
        "just a string",                                                           # 6 not an object
        {"output": "b", "input": ["x"]},                                           # 7 missing + non-string
        {"instruction": "a", "output": "b", "history": "q/a"},                     # 8 history not a list
    ]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        convert(str(path))
    assert problems_of(e) == [
        ("index 1", "output", "missing"),
        ("index 2", "instruction", "must be a string, got int"),
        ("index 3", "output", "empty reply"),
        ("index 4", "instruction", "empty (and input is empty too)"),
        ("index 5", "history[0]", "must be a [question, answer] pair of strings"),
        ("index 6", "", "a row must be a JSON object, got str"),
        ("index 7", "instruction", "missing"),
        ("index 7", "input", "must be a string, got list"),
        ("index 8", "history", "must be a list of [question, answer] pairs, got str"),
    ]


def test_bad_sharegpt_rows_reported_at_once(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, "gpt: b"]},
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]},
        {"system": 3, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
    ]), encoding="utf-8")
    with pytest.raises(DataError) as e:
        convert(str(path))
    assert problems_of(e) == [
        ("index 0", "conversations[1].from", "unknown role 'robot'; expected one of assistant, gpt, human, model, system, user"),
        ("index 1", "conversations[1]", "must be an object with 'from' and 'value'"),
        ("index 2", "conversations[0].role", "roles out of order: expected 'user', got 'assistant'"),
        ("index 3", "system", "must be a string, got int"),
    ]


def test_forced_format_reports_rows_of_another_format(tmp_path):
    with pytest.raises(DataError) as e:
        to_conversations(read_rows(OPENAI), "alpaca")
    assert [(p.where, p.field, p.reason) for p in e.value.problems[:2]] == [
        ("line 1", "instruction", "missing"), ("line 1", "output", "missing"),
    ]
    assert len(e.value.problems) == 6


def test_problems_of_all_files_in_one_error(tmp_path):
    bad_rows = jsonl(tmp_path / "rows.jsonl", [{"messages": [user("a")]}, {"messages": [user("b"), assistant("c")]}])
    bad_bytes = tmp_path / "bytes.jsonl"
    bad_bytes.write_bytes(b'{"messages": "\xff"}\n')
    bad_syntax = tmp_path / "syntax.jsonl"
    bad_syntax.write_text('{"messages": [}\n', encoding="utf-8")
    paths = [ALPACA, bad_rows, str(bad_bytes), str(bad_syntax), str(tmp_path / "missing.json")]
    with pytest.raises(DataError) as e:
        read_conversations(paths, DataConfig(train=paths), {})
    assert [(p.source, p.where) for p in e.value.problems] == [
        (bad_rows, "line 1"),
        (str(bad_bytes), "line 1"),
        (str(bad_syntax), "line 1"),
        (str(tmp_path / "missing.json"), ""),
    ]
    assert "Fix the rows above" in str(e.value)


def test_many_problems_are_summarised(tmp_path):
    path = jsonl(tmp_path / "many.jsonl", [{"messages": [user("q")]} for _ in range(60)])
    with pytest.raises(DataError) as e:
        convert(path)
    assert len(e.value.problems) == 60
    msg = str(e.value)
    assert msg.startswith("the data has 60 problems:")
    assert "... and 10 more" in msg
    assert f"{path}:line 50:" in msg and f"{path}:line 51:" not in msg


# ---------------------------------------------------------------- validation split


def test_fractional_validation_split_is_deterministic_and_disjoint():
    cfg = DataConfig(train=[ALPACA], validation=0.3, seed=1)
    train, val, formats = load_conversations(cfg)
    assert formats == {ALPACA: "alpaca"}
    assert len(val) == 3 and len(train) == 7
    train_ids = {c.where for c in train}
    val_ids = {c.where for c in val}
    assert not train_ids & val_ids
    assert train_ids | val_ids == {f"index {i}" for i in range(10)}
    # the original order is kept within each split
    assert [c.where for c in train] == sorted((c.where for c in train), key=lambda w: int(w.split()[1]))

    again_train, again_val, _ = load_conversations(DataConfig(train=[ALPACA], validation=0.3, seed=1))
    assert [c.where for c in again_val] == [c.where for c in val]
    assert [c.messages for c in again_train] == [c.messages for c in train]

    splits = {tuple(c.where for c in load_conversations(DataConfig(train=[ALPACA], validation=0.3, seed=s))[1])
              for s in range(6)}
    assert len(splits) > 1  # the seed matters


def test_tiny_validation_fraction_holds_out_at_least_one_row():
    train, val, _ = load_conversations(DataConfig(train=[OPENAI], validation=0.01))
    assert len(val) == 1 and len(train) == 2


def test_validation_file():
    train, val, formats = load_conversations(DataConfig(train=[ALPACA], validation=OPENAI))
    assert len(train) == 10 and len(val) == 3
    assert formats == {ALPACA: "alpaca", OPENAI: "openai"}


def test_jsonl_strings_may_hold_line_separators(tmp_path):
    """U+2028, U+2029 and U+0085 are valid raw inside JSON strings (json.dumps(ensure_ascii=False)
    writes them so): a JSONL line ends at a newline only."""
    path = tmp_path / "seps.jsonl"
    rows = [{"instruction": "Quote it", "output": "one\u2028two\u0085three"}, {"instruction": "hi", "output": "ok"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    read = read_rows(str(path))
    assert [r.value for r in read] == rows and [r.where for r in read] == ["line 1", "line 2"]


def test_a_json_list_saved_as_jsonl_is_read_as_a_list(tmp_path):
    path = tmp_path / "list.jsonl"
    rows = [{"instruction": "hi", "output": "ok"}, {"instruction": "bye", "output": "farewell"}]
    path.write_text(json.dumps(rows, indent=2))
    assert [r.value for r in read_rows(str(path))] == rows


def test_openai_reasoning_content_is_kept_and_checked(tmp_path):
    from chatlora.config.schema import DataConfig
    from chatlora.data.prepare import load_conversations
    from chatlora.errors import DataError

    good = tmp_path / "r.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a", "reasoning_content": "think first"}]}) + "\n")
    (conv,), _, _ = load_conversations(DataConfig(train=[str(good)]))
    assert conv.messages[-1] == {"role": "assistant", "content": "a", "reasoning_content": "think first"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                            {"role": "assistant", "content": "a", "reasoning_content": 3}]}) + "\n")
    with pytest.raises(DataError) as e:
        load_conversations(DataConfig(train=[str(bad)]))
    assert "messages[1].reasoning_content" in str(e.value) and "must be a string" in str(e.value)
