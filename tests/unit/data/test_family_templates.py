"""Masking with the real chat templates of today's model families (tests/fixtures/templates, each kept
verbatim with its source in families.json): on multi-turn data with and without a system prompt, with
reasoning where the family has it, train_on all and last, the trained bytes are exactly each reply and
what closes it (the family's end-of-turn token, as written in the template), and each reply follows
the prompt inference renders for it. The expectations below are read off the templates by hand, not
computed by chatlora."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from chatlora.data import preflight
from chatlora.data.render import IGNORE, Renderer
from chatlora.data.truncate import fit
from chatlora.model.load import fix_pad_token
from conftest import FIXTURES, build_byte_tokenizer

TEMPLATES = FIXTURES / "templates"
FAMILIES = {f["id"]: f for f in json.loads((TEMPLATES / "families.json").read_text())}

IM_END, EOT_ID, GEMMA, EOS_S, PHI, DS = "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|end|>", "<｜end▁of▁sentence｜>"
# family: (what closes a reply, as the template writes it after the reply; masking strategy; system prompt)
# strategy "prefix": every reply in one sample; "per-turn": some replies need samples of their own.
# system "role": the template has one; "folded": it refuses or drops system messages, so chatlora writes
# the system prompt before the first user message.
EXPECTED = {
    "qwen1.5-7b-chat": (IM_END, "prefix", "role"),
    "qwen1.5-72b-chat": (IM_END, "prefix", "role"),        # the last message gets no terminator: the next turn's
    "qwen2.5-7b-instruct": (IM_END, "prefix", "role"),
    "qwen3": (IM_END, "per-turn", "role"),                 # empty think block in the last turn only
    "meta-llama-3-8b-instruct": (EOT_ID, "prefix", "role"),  # always appends the assistant header
    "meta-llama-3-8b-instruct-may2024": (EOT_ID, "prefix", "role"),
    "llama-3.1-8b-instruct": (EOT_ID, "prefix", "role"),
    "llama-3.2-3b-instruct": (EOT_ID, "prefix", "role"),
    "gemma-2-2b-it": (GEMMA, "prefix", "folded"),          # raises on a system role
    "gemma-3-it": (GEMMA, "prefix", "role"),               # folds it itself
    "gemma-3-1b-it-mar2025": (GEMMA, "prefix", "folded"),  # wants list-of-parts system content
    "mistral-7b-instruct-v0.2": (EOS_S, "prefix", "folded"),  # raises on a system role
    "mistral-7b-instruct-v0.3": (" " + EOS_S, "prefix", "folded"),  # drops system messages; ' ' before </s>
    "mixtral-8x7b-instruct-v0.1": (EOS_S, "prefix", "role"),   # writes it before the first user turn itself
    "mistral-nemo-instruct-2407": (EOS_S, "per-turn", "role"),  # system prompt in the last user turn only
    "phi-3-mini-4k-instruct": (PHI, "prefix", "role"),     # <|end|>\n then <|endoftext|> after the last turn
    "phi-3-mini-4k-instruct-3a81184": (PHI, "prefix", "role"),
    "phi-3.5-mini-instruct": (PHI, "prefix", "role"),
    "phi-4": (IM_END, "prefix", "role"),
    "glm-4-9b-chat": ("<|user|>", "prefix", "role"),       # no end-of-turn token: the next user header
    "deepseek-r1-distill-qwen": (DS, "per-turn", "role"),  # prompt opens <think>; history turns drop it
    "deepseek-r1-distill-qwen-jan2025": (DS, "prefix", "role"),
    "deepseek-v2-chat": (DS, "prefix", "role"),
    "deepseek-v3": (DS, "prefix", "role"),
    "internlm2-chat-7b": (IM_END, "prefix", "role"),
    "yi-1.5-6b-chat": (IM_END, "prefix", "role"),
    "smollm2-135m-instruct": (IM_END, "prefix", "role"),
}
# Reasoning (reasoning_content) as the trained text writes it, for the families whose template or
# generation prompt carries it: Qwen3 writes it in the turn being trained; the R1 distill's prompt
# opens <think> and its template drops reasoning from turns, so chatlora closes the block itself.
REASONED = {
    "qwen3": lambda thought, reply: f"<think>\n{thought}\n</think>\n\n{reply}",
    "deepseek-r1-distill-qwen": lambda thought, reply: f"{thought}\n</think>\n\n{reply}",
}

SYSTEM = "You are a pirate captain."
TURNS = [("Who are you?", "Captain Flint, at your service."),
         ("Where is the treasure?", "Buried under the old oak, matey."),
         ("Will you share it?", "Never, not a single coin!")]


def conversation(system: bool, thought: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}] if system else []
    for q, a in TURNS:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if thought:
        messages[-1]["reasoning_content"] = thought
    return messages


def family_tokenizer(family: dict):
    """The byte tokenizer with the family's special tokens and template (no hub: the vocabulary is
    bytes, the specials are the family's own strings)."""
    tok = build_byte_tokenizer(template=(TEMPLATES / f"{family['id']}.jinja").read_text())
    specials = [t for t in [family["bos"], family["eos"], family["pad"], *family["generation_stops"], *family["specials"]] if t]
    tok.add_special_tokens({"additional_special_tokens": list(dict.fromkeys(specials))})
    tok.eos_token = family["eos"]
    tok.bos_token = family["bos"]
    tok.pad_token = family["pad"] or "<|endoftext|>"
    return tok


def renderer(family_id: str, train_on: str = "all", reasoning: str = "keep") -> Renderer:
    family = FAMILIES[family_id]
    tok = family_tokenizer(family)
    stops = {tok.convert_tokens_to_ids(t) for t in family["generation_stops"]}
    return Renderer(tok, stops, train_on, reasoning)


def spans(tok, input_ids: list[int], labels: list[int]) -> list[tuple[int, str]]:
    """(first token index, decoded text) of each trained run."""
    out, current, first = [], [], 0
    for k, (token, label) in enumerate(zip(input_ids, labels)):
        if label != IGNORE:
            assert label == token
            if not current:
                first = k
            current.append(token)
        elif current:
            out.append((first, tok.decode(current)))
            current = []
    if current:
        out.append((first, tok.decode(current)))
    return out


def inference_prompt(r: Renderer, messages: list[dict], folded: bool) -> str:
    """The template's own rendering of the prompt, folded by hand where the template has no system role."""
    if folded and messages[0]["role"] == "system":
        first = {**messages[1], "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [first, *messages[2:]]
    return r.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_every_family_has_an_expectation():
    assert set(EXPECTED) == set(FAMILIES)


@pytest.mark.parametrize("family_id", sorted(EXPECTED))
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_trained_bytes_are_each_reply_and_its_end_of_turn(family_id, system, train_on):
    end, _, system_kind = EXPECTED[family_id]
    r = renderer(family_id, train_on)
    messages = conversation(system)
    samples = r.split(messages)
    replies = [a for _, a in TURNS][-1:] if train_on == "last" else [a for _, a in TURNS]
    found = []
    for turns, sample in samples:
        text_spans = spans(r.tokenizer, sample.input_ids, sample.labels)
        assert len(text_spans) == len(turns)
        for turn, (first, text) in zip(turns, text_spans):
            found.append(text)
            # The reply follows the prompt inference renders for it (what the template writes between
            # the generation prompt and the reply, Qwen3's empty think block, say, stays untrained).
            before = r.tokenizer.decode(sample.input_ids[:first])
            assert before.startswith(inference_prompt(r, messages[:turn], system_kind == "folded"))
        # Nothing is trained past the first token generation stops on.
        assert sample.labels[-1] in r.end_ids and sample.input_ids[-1] == sample.labels[-1]
    assert sorted(found) == sorted(reply + end for reply in replies)
    if system:
        rendered = [r.tokenizer.decode(s.input_ids) for _, s in samples]
        assert all(SYSTEM in text for text in rendered)  # never dropped, folded where it has no role


@pytest.mark.parametrize("family_id", sorted(EXPECTED))
def test_strategy_system_handling_and_end_of_turn(family_id):
    end, strategy, system_kind = EXPECTED[family_id]
    r = renderer(family_id)
    assert r.strategy == strategy
    assert r.fold_system == (system_kind == "folded")
    assert r.tokenizer.convert_ids_to_tokens(r.end_of_turn()) == end.strip()
    assert r.end_of_turn() in r.end_ids


@pytest.mark.parametrize("family_id", sorted(REASONED))
@pytest.mark.parametrize("reasoning", ["keep", "drop"])
def test_reasoning_is_trained_where_the_family_writes_it(family_id, reasoning):
    end = EXPECTED[family_id][0]
    r = renderer(family_id, "last", reasoning)
    thought = "They ask about me; I answer in character."
    for messages in (conversation(True, thought),
                     conversation(True)[:-1] + [{"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\n{TURNS[-1][1]}"}]):
        (turns, sample), = r.split(messages)
        (_, text), = spans(r.tokenizer, sample.input_ids, sample.labels)
        reply = TURNS[-1][1]
        assert text == (REASONED[family_id](thought, reply) if reasoning == "keep" else reply) + end


def test_a_family_without_reasoning_in_its_template_trains_the_reply_alone():
    r = renderer("deepseek-r1-distill-qwen-jan2025", "last")
    (_, sample), = r.split(conversation(False, "hidden thought"))
    (_, text), = spans(r.tokenizer, sample.input_ids, sample.labels)
    assert text == TURNS[-1][1] + DS


@pytest.mark.parametrize("family_id", ["qwen3", "mistral-nemo-instruct-2407", "glm-4-9b-chat", "phi-3-mini-4k-instruct"])
def test_fit_and_the_preflight_accept_every_sample(family_id):
    r = renderer(family_id)
    samples = fit(conversation(True), r, 4096, "error", Counter())
    assert sum(s.trained > 0 for s, _ in samples) == len(samples)
    dataset = {"input_ids": [s.input_ids for s, _ in samples], "labels": [s.labels for s, _ in samples],
               "origin": [f"x:{k}" for k in range(len(samples))], "cut": [cut for _, cut in samples]}
    eot = r.end_of_turn()
    fix_pad_token(r.tokenizer, eot)  # as the data check does first (Phi-3 and GLM-4 pad with their eos)
    assert preflight.check(dataset, r.tokenizer, sorted(r.end_ids), eot).failures == []


def save_family_model(folder, family_id: str):
    """A 2-layer Llama whose tokenizer is the family's (bytes + its specials + its real template), with
    the family's generation stops: what `chatlora data check` and `train` load from a local folder."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    family = FAMILIES[family_id]
    tok = family_tokenizer(family)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids(t) for t in family["generation_stops"]]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family_id,strategy,system_note", [("qwen3", "per-turn", False), ("gemma-2-2b-it", "prefix", True),
                                                            ("glm-4-9b-chat", "prefix", False)])
def test_data_check_and_training_on_a_family(family_id, strategy, system_note, tmp_path):
    from chatlora.model.tokenized import check_data
    from chatlora.recipes.train import train
    from conftest import tiny_config

    model = save_family_model(tmp_path / "model", family_id)
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": conversation(k % 2 == 0)}) + "\n" for k in range(6)))
    cfg = tiny_config(model, tmp_path, "training.max_steps=2", "data.max_length=512", data=str(data))
    lines: list[str] = []
    check_data(cfg, lines.append, color=False)
    text = "\n".join(lines)
    assert f"masking: {strategy}" in text and "pre-flight: ok" in text
    assert ("system prompts: the template has no system role" in text) == system_note
    samples = 6 * len(TURNS) if strategy == "per-turn" else 6
    assert f"train: 6 rows -> {samples} samples" in text
    run = train(cfg, echo=lambda _line: None)
    assert (run.path / "adapter" / "adapter_model.safetensors").is_file()
