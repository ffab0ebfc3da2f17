"""chatlora's tokens against the tutorial's `process_func`, on the real data and the real Qwen tokenizer.

The tutorial writes ChatML by hand and trains `reply + <|endoftext|>` (its pad token). chatlora
renders with the tokenizer's own template and trains `reply + <|im_end|>`. The prompts and reply
tokens must be identical; the single difference is the trained terminator, and it is the fix: Qwen's
chat template and generation stop on `<|im_end|>`, so a model taught to end with `<|endoftext|>`
learns a token the template never shows at the end of a turn.
"""

from __future__ import annotations

import pytest

from chatlora.config.schema import DataConfig
from chatlora.data.prepare import load_conversations
from chatlora.data.render import IGNORE, Renderer
from conftest import SHARED_DATA

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
HUANHUAN = SHARED_DATA / "huanhuan.json"
QWEN = SHARED_DATA / "qwen-tokenizer"

pytestmark = pytest.mark.skipif(not (HUANHUAN.is_file() and QWEN.is_dir()), reason=f"tutorial data not found in {SHARED_DATA}")


def tutorial_process_func(example, tokenizer):
    """The tutorial's function, verbatim but for the tokenizer argument."""
    MAX_LENGTH = 384
    input_ids, attention_mask, labels = [], [], []
    instruction = tokenizer(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{example['instruction'] + example['input']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    response = tokenizer(f"{example['output']}", add_special_tokens=False)
    input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
    if len(input_ids) > MAX_LENGTH:
        input_ids = input_ids[:MAX_LENGTH]
        attention_mask = attention_mask[:MAX_LENGTH]
        labels = labels[:MAX_LENGTH]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def test_every_huanhuan_row_matches_the_tutorial_but_for_the_terminator():
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(QWEN)
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    cfg = DataConfig(train=[str(HUANHUAN)], system_prompt=SYSTEM, max_length=384)
    conversations, _, formats = load_conversations(cfg)
    assert formats == {str(HUANHUAN): "alpaca"}
    rows = json.loads(HUANHUAN.read_text("utf-8"))
    assert len(conversations) == len(rows) == 3729

    renderer = Renderer(tokenizer, {im_end, endoftext})
    assert renderer.end_of_turn() == im_end
    for row, conv in zip(rows, conversations):
        ours = renderer.tokenize(conv.messages)
        theirs = tutorial_process_func(row, tokenizer)
        assert len(theirs["input_ids"]) < 384, "no huanhuan row reaches the tutorial's cut"
        # Prompt ids, reply ids and the mask are identical...
        assert ours.input_ids[:-1] == theirs["input_ids"][:-1]
        assert ours.labels[:-1] == theirs["labels"][:-1]
        # ...and the trained terminator is the template's end-of-turn token, not the pad token.
        assert theirs["input_ids"][-1] == theirs["labels"][-1] == tokenizer.pad_token_id == endoftext
        assert ours.input_ids[-1] == ours.labels[-1] == im_end
        # Labels never come from the pad id.
        assert tokenizer.pad_token_id not in [t for t in ours.labels if t != IGNORE]
