"""The Ollama Modelfile's TEMPLATE is found from the model's own chat template: its pieces put back
together equal the template's rendering of any conversation, and the Go template carries them."""

from __future__ import annotations

import pytest

from conftest import CHATML, SHARED_DATA, build_byte_tokenizer
from chatlora.data.render import Renderer
from chatlora.errors import ChatloraError
from chatlora.export.modelfile import chat_pieces, go_template, modelfile

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c\nd"}],
]


def qwen_renderer():
    from transformers import AutoTokenizer

    if not (SHARED_DATA / "qwen-tokenizer").is_dir():
        pytest.skip(f"the Qwen tokenizer is not in {SHARED_DATA}")

    return Renderer(AutoTokenizer.from_pretrained(SHARED_DATA / "qwen-tokenizer"), set())


@pytest.mark.parametrize("make", [lambda: Renderer(build_byte_tokenizer(), set()), qwen_renderer], ids=["chatml", "qwen"])
def test_pieces_render_as_the_template_does(make):
    renderer = make()
    pieces = chat_pieces(renderer.text)
    for messages in CONVERSATIONS:
        shown = messages if messages[0]["role"] == "system" or pieces.default_system is None else \
            [{"role": "system", "content": pieces.default_system}, *messages]
        assert pieces.render(shown) == renderer.text(messages, generation_prompt=True)
    assert pieces.suffix["assistant"] == "<|im_end|>\n" and pieces.generation == "<|im_start|>assistant\n"


def test_qwen_default_system_prompt_is_found():
    assert chat_pieces(qwen_renderer().text).default_system == "You are a helpful assistant."
    assert chat_pieces(Renderer(build_byte_tokenizer(), set()).text).default_system is None


def test_the_modelfile_carries_template_system_stops_and_sampling():
    pieces = chat_pieces(Renderer(build_byte_tokenizer(), set()).text)
    text = modelfile("m-q8_0.gguf", pieces, ["<|im_end|>"], "You are {{terse}}.", {"temperature": 0})
    assert text.startswith("FROM ./m-q8_0.gguf\n")
    assert 'SYSTEM """You are {{terse}}."""' in text and 'PARAMETER stop "<|im_end|>"' in text
    assert "PARAMETER temperature 0" in text
    template = go_template(pieces)
    assert '{{ if eq .Role "user" }}' not in template  # system comes first, user is an else-if
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in template
    assert template.endswith('{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}{{ end }}')


def test_a_template_that_depends_on_position_is_refused():
    odd = CHATML.replace("message['content']", "message['content'] + (loop.index|string)")
    with pytest.raises(ChatloraError, match="no Ollama TEMPLATE can equal it"):
        chat_pieces(Renderer(build_byte_tokenizer(template=odd), set()).text)
