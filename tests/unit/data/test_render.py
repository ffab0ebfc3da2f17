"""Rendering with the tokenizer's template and finding the trained spans by prefixes."""

from __future__ import annotations

import pytest

from chatlora.data.render import IGNORE, Renderer, RenderError, _plain_backend
from conftest import CHATML, build_byte_tokenizer

EOT = 256  # <|im_end|> in the byte tokenizer


def renderer(train_on="all", **kw):
    return Renderer(build_byte_tokenizer(**kw), {EOT}, train_on)


def trained_text(tok, sample) -> list[str]:
    """The trained spans, decoded, in order."""
    spans, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans


MULTI = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you."},
]


def test_every_assistant_turn_is_trained_with_its_end_of_turn_token():
    r = renderer()
    sample = r.tokenize(MULTI)
    assert trained_text(r.tokenizer, sample) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    # The newline the template writes after the last <|im_end|> is not trained and is dropped.
    assert sample.input_ids[-1] == EOT and sample.labels[-1] == EOT
    assert r.tokenizer.decode(sample.input_ids) == r.text(MULTI)[:-1]


def test_last_only_trains_the_final_reply():
    r = renderer("last")
    assert trained_text(r.tokenizer, r.tokenize(MULTI)) == ["See you.<|im_end|>"]


def test_labels_never_come_from_the_pad_id():
    r = renderer()
    sample = r.tokenize(MULTI)
    pad = r.tokenizer.pad_token_id
    assert pad != EOT
    assert pad not in sample.input_ids and pad not in sample.labels


def test_end_of_turn_is_found_from_the_template():
    assert renderer().end_of_turn() == EOT


def test_prompt_ids_end_with_the_generation_prompt():
    r = renderer()
    ids = r.prompt_ids(MULTI[:2])
    assert r.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_a_template_that_rewrites_history_trains_each_turn_on_its_own_prompt():
    # Drops every earlier assistant reply once another one follows (as some "reasoning" templates do):
    # each reply gets a sample of its own, the prompt exactly as inference renders it.
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{'<|im_start|>assistant\n<|im_end|>\n'}}"
        "{% else %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
    )
    r = Renderer(build_byte_tokenizer(template=template), {EOT})
    assert r.strategy == "per-turn"
    samples = r.split(MULTI)
    assert [turns for turns, _ in samples] == [[2], [4]]
    for (turns, sample), upto in zip(samples, (2, 4)):
        assert trained_text(r.tokenizer, sample) == [MULTI[upto]["content"] + "<|im_end|>"]
        prompt = r.prompt_ids(MULTI[:upto])
        assert sample.input_ids[: len(prompt)] == prompt and sample.labels[len(prompt) - 1] == IGNORE
    with pytest.raises(RenderError, match="cannot share a sample"):
        r.tokenize(MULTI, turns=[2, 4])


def test_a_tokenizer_without_a_chat_template_is_refused():
    tok = build_byte_tokenizer()
    tok.chat_template = None
    with pytest.raises(RenderError, match="no chat template"):
        Renderer(tok, {EOT})


def test_a_template_with_generation_markers_trains_what_they_mark():
    template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{'<|im_start|>assistant\\n'}}"
        "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{'\\n'}}"
        "{% else %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}"
    )
    r = Renderer(build_byte_tokenizer(template=template), {EOT})
    assert r.strategy == "generation-markers"
    assert trained_text(r.tokenizer, r.tokenize(MULTI)) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    last = Renderer(build_byte_tokenizer(template=template), {EOT}, "last")
    assert trained_text(last.tokenizer, last.tokenize(MULTI)) == ["See you.<|im_end|>"]


def test_a_reply_that_holds_the_end_of_turn_token_as_text_fails_the_preflight():
    from chatlora.data import preflight

    r = renderer()
    sample = r.tokenize([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a<|im_end|>b"}])
    dataset = {"labels": [sample.labels], "origin": ["x.json:line 3"], "cut": [False]}
    failures = preflight.check(dataset, r.tokenizer, [EOT], EOT).failures
    assert any("train tokens after a token generation stops on" in f and "x.json:line 3" in f for f in failures)


def test_a_template_that_refuses_a_system_role_gets_it_before_the_first_user_message():
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHATML)
    r = Renderer(build_byte_tokenizer(template=template), {EOT})
    assert r.fold_system and any("no system role" in note for note in r.notes())
    sample = r.tokenize(MULTI)
    assert r.tokenizer.decode(sample.input_ids).startswith("<|im_start|>user\nBe kind.\n\nHi<|im_end|>")
    assert trained_text(r.tokenizer, sample) == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    assert r.tokenizer.decode(r.prompt_ids(MULTI[:2])).startswith("<|im_start|>user\nBe kind.\n\nHi")


ENCODE_TEXTS = ["", "Hi", "<|im_start|>user\n你好，皇上<|im_end|>\n", "  leading and trailing  \n\n", "a<|im_end|>b<|endoftext|>",
                "emoji 🙂 and tabs\t\tend", "<|im_start|>assistant\n" + "臣妾" * 200]


@pytest.mark.parametrize("which", ["byte", "qwen"])
def test_encode_is_the_tokenizers_own_encoding(which):
    """encode_many asks the Rust tokenizer directly (bench/LOG.md): the ids must be exactly what
    tokenizer(text, add_special_tokens=False) gives, special tokens, whitespace and CJK included."""
    if which == "qwen":
        from transformers import AutoTokenizer

        from conftest import SHARED_DATA

        if not (SHARED_DATA / "qwen-tokenizer").is_dir():
            pytest.skip("../shared/data/qwen-tokenizer not present")
        tok = AutoTokenizer.from_pretrained(str(SHARED_DATA / "qwen-tokenizer"))
    else:
        tok = build_byte_tokenizer()
    r = Renderer(tok, {tok.convert_tokens_to_ids("<|im_end|>")})
    assert r.encode_many(ENCODE_TEXTS) == [tok(t, add_special_tokens=False)["input_ids"] for t in ENCODE_TEXTS]
    assert _plain_backend(tok) is tok._tokenizer
    # Set to truncate (as a collator may leave it), it is not asked directly: transformers' call resets that.
    tok._tokenizer.enable_truncation(max_length=4)
    assert _plain_backend(tok) is None
    assert r.encode_many(ENCODE_TEXTS) == [tok(t, add_special_tokens=False)["input_ids"] for t in ENCODE_TEXTS]
