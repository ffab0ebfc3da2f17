"""The pre-flight's hard failures, the pad-token fix and the tokenization cache."""

from __future__ import annotations

import json
import shutil

import pytest

from chatlora.data import preflight
from chatlora.data.render import Renderer
from chatlora.errors import PreflightError
from chatlora.model.load import fix_pad_token
from chatlora.model.tokenized import check_data
from conftest import FIXTURES, build_byte_tokenizer, tiny_config

EOT, ENDOFTEXT = 256, 257


def quiet(_line: str) -> None:
    pass


def test_the_fixture_data_passes_and_reports(tiny_model_dir, tmp_path):
    lines: list[str] = []
    checked = check_data(tiny_config(tiny_model_dir, tmp_path), lines.append, samples=1, color=False)
    text = "\n".join(lines)
    assert "train: 10 rows -> 10 samples" in text
    assert "[[I am Juniper, the greenhouse robot.<|im_end|>]]" in text
    assert "end-of-turn token: <|im_end|>; generation stops on: <|im_end|>; pad token: <|endoftext|>" in text
    assert text.endswith("pre-flight: ok")
    assert checked.report["train"]["samples"] == 10


def test_generation_config_that_does_not_stop_on_the_end_of_turn_token(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": ENDOFTEXT}))
    with pytest.raises(PreflightError, match=r'ends replies with <\|im_end\|> but the model\'s generation config stops on <\|endoftext\|>.*model.stop_tokens'):
        check_data(tiny_config(model, tmp_path, "model.name=" + str(model)), quiet)
    # The fix the message names works.
    check_data(tiny_config(model, tmp_path, "model.stop_tokens=[<|im_end|>]"), quiet)


def test_samples_with_no_trained_token_fail(tiny_model_dir, tmp_path):
    data = tmp_path / "long_system.jsonl"
    row = {"messages": [{"role": "system", "content": "s" * 300}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    data.write_text(json.dumps(row) + "\n")
    cfg = tiny_config(tiny_model_dir, tmp_path, "data.max_length=64", "data.overlong=truncate", data=str(data))
    with pytest.raises(PreflightError, match=r"1 sample\(s\) have no trained token: .*long_system.jsonl:line 1"):
        check_data(cfg, quiet)


def test_a_template_without_an_end_of_turn_token_fails(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tok = build_byte_tokenizer(template="{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tok.save_pretrained(model)
    with pytest.raises(PreflightError) as e:
        check_data(tiny_config(model, tmp_path), quiet)
    assert "no end-of-turn token" in str(e.value)


def test_pad_equal_to_end_of_turn_fails_the_check():
    tok = build_byte_tokenizer(pad="<|im_end|>")
    sample = Renderer(tok, {EOT}).tokenize([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    dataset = {"labels": [sample.labels], "origin": ["x:line 1"], "cut": [False]}
    result = preflight.check(dataset, tok, [EOT], EOT)
    assert any("pad token <|im_end|> is the end-of-turn token" in f for f in result.failures)


@pytest.mark.parametrize("pad", [None, "<|im_end|>"])
def test_fix_pad_token_picks_a_token_that_is_not_the_end_of_turn(pad):
    tok = build_byte_tokenizer(pad=pad)
    note = fix_pad_token(tok, EOT)
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == ENDOFTEXT
    assert "padding with <|endoftext|>" in note
    assert fix_pad_token(tok, EOT) is None  # already fine: nothing changes


def test_fix_pad_token_adds_one_when_no_candidate_exists():
    tok = build_byte_tokenizer(pad=None)
    vocab_before = len(tok)
    note = fix_pad_token(tok, ENDOFTEXT)  # pretend <|endoftext|> is the end of turn, so it is not a candidate
    assert tok.pad_token not in ("<|endoftext|>", "<|im_end|>") and len(tok) == vocab_before + 1
    assert note


def test_tokenization_is_cached_by_content(tiny_model_dir, tmp_path):
    def check(*overrides, data=None):
        lines: list[str] = []
        check_data(tiny_config(tiny_model_dir, tmp_path, *overrides, data=data), lines.append)
        return "\n".join(lines)

    first = check("data.max_length=120")
    assert "from cache" not in first
    assert "[tokenized earlier: from cache]" in check("data.max_length=120")
    assert "from cache" not in check("data.max_length=121")  # a setting changed
    copy = tmp_path / "copy.json"
    rows = json.loads((FIXTURES / "alpaca.json").read_text())
    copy.write_text(json.dumps(rows[:-1]))
    assert "from cache" not in check("data.max_length=120", data=str(copy))  # the data changed


def test_a_cached_split_names_the_file_given_now(tiny_model_dir, tmp_path):
    """The cache is keyed by content: the same rows in another file come from it, and the rendered
    samples name that other file, not the one that filled the cache."""
    def rendered(data):
        lines: list[str] = []
        check_data(tiny_config(tiny_model_dir, tmp_path, data=str(data)), lines.append, samples=1, color=False)
        return "\n".join(lines)

    first, second = tmp_path / "first.json", tmp_path / "second.json"
    shutil.copy(FIXTURES / "alpaca.json", first)
    shutil.copy(FIXTURES / "alpaca.json", second)
    assert f"{first}:index 0" in rendered(first)
    again = rendered(second)
    assert "from cache" in again and f"{second}:index 0" in again and str(first) not in again


def test_a_damaged_cache_entry_is_made_again(tiny_model_dir, tmp_path):
    """A cache entry cut short (a full disk, a killed copy) is tokenized again, not a pyarrow traceback."""
    def check():
        lines: list[str] = []
        check_data(tiny_config(tiny_model_dir, tmp_path, f"data.cache_dir={tmp_path / 'cache'}"), lines.append)
        return "\n".join(lines)

    check()
    assert "from cache" in check()
    for arrow in (tmp_path / "cache").glob("tokens/*/data/*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:40])
    again = check()
    assert "from cache" not in again and again.endswith("pre-flight: ok")
    assert "from cache" in check()
