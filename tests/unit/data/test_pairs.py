"""Preference rows: each format detected and converted, bad rows named by file, line and field, and
pairs rendered with the tokenizer's own template (data/pairs.py)."""

from __future__ import annotations

import pytest

from chatlora.data.pairs import Preference, detect, render_preference, to_preferences
from chatlora.data.read import RawRow
from chatlora.data.render import IGNORE, Renderer, RenderError
from chatlora.errors import DataError

A = {"role": "assistant"}
GOOD = {
    "trl": {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{**A, "content": "Ahoy!"}], "rejected": [{**A, "content": "Hello."}]},
    "messages": {"messages": [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "Hi"}],
                 "chosen": {**A, "content": "Ahoy!"}, "rejected": {**A, "content": "Hello."}},
    "alpaca": {"instruction": "Hi", "input": "", "chosen": "Ahoy!", "rejected": "Hello."},
    "kto": {"messages": [{"role": "user", "content": "Hi"}, {**A, "content": "Ahoy!"}], "label": True},
}


def rows(*values):
    return [RawRow("f.jsonl", f"line {i + 1}", v) for i, v in enumerate(values)]


@pytest.mark.parametrize("fmt", list(GOOD))
def test_each_format_is_detected_and_read(fmt):
    got = to_preferences(rows(GOOD[fmt]), detect(rows(GOOD[fmt]), "f.jsonl"))[0]
    assert got.prompt[-1] == {"role": "user", "content": "Hi"}
    assert got.chosen == {**A, "content": "Ahoy!"}
    assert got.rejected == (None if fmt == "kto" else {**A, "content": "Hello."})
    assert got.label is (True if fmt == "kto" else None)


def test_trl_string_prompt():
    got = to_preferences(rows({"prompt": "Hi", "chosen": "Ahoy!", "rejected": "Hello."}), "trl")[0]
    assert got.prompt == [{"role": "user", "content": "Hi"}] and got.chosen["content"] == "Ahoy!"


def test_bad_rows_are_all_named():
    bad = rows(
        {"prompt": "Hi", "chosen": "Same", "rejected": "Same"},
        {"prompt": "Hi", "chosen": "Ahoy!"},
        {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
        {"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
        {"prompt": "Hi", "chosen": "  ", "rejected": "b"},
    )
    with pytest.raises(DataError) as e:
        to_preferences(bad, "trl")
    found = [(p.where, p.field, p.reason) for p in e.value.problems]
    assert ("line 1", "rejected", "the same reply as chosen; a pair must differ") in found
    assert ("line 2", "rejected", "missing") in found
    assert any(w == "line 3" and "roles out of order" in r for w, _, r in found)
    assert ("line 4", "chosen[0].role", "must be 'assistant', got 'user'") in found
    assert ("line 5", "chosen", "empty reply") in found


def test_kto_label_must_be_boolean():
    with pytest.raises(DataError) as e:
        to_preferences(rows({**GOOD["kto"], "label": "yes"}), "kto")
    assert e.value.problems[0].field == "label"


def test_pair_renders_with_one_prompt_and_trained_replies(byte_tokenizer):
    renderer = Renderer(byte_tokenizer, {byte_tokenizer.eos_token_id})
    pair = to_preferences(rows(GOOD["messages"]), "messages")[0]
    chosen, rejected = render_preference(renderer, pair)
    start = next(k for k, label in enumerate(chosen.labels) if label != IGNORE)
    assert chosen.input_ids[:start] == rejected.input_ids[:start]
    decode = lambda s: byte_tokenizer.decode([t for t in s.labels if t != IGNORE])  # noqa: E731
    assert decode(chosen) == "Ahoy!<|im_end|>" and decode(rejected) == "Hello.<|im_end|>"


def test_prompt_rendering_differently_per_branch_is_an_error(byte_tokenizer):
    from conftest import build_byte_tokenizer

    # A template that writes the reply's length into the prompt: the two branches' prompts differ.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user{{ messages[-1]['content']|length }}\n"
                "{{ m['content'] }}<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = build_byte_tokenizer(template=template)
    pair = Preference([{"role": "user", "content": "Hi"}], {**A, "content": "Ahoy!"}, {**A, "content": "Hello there."}, "f", "line 1")
    with pytest.raises(RenderError):
        render_preference(Renderer(tok, {tok.eos_token_id}), pair)
