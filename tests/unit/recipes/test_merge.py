"""`chatlora merge` on the tiny model: merged logits equal base + adapter, what is saved, and refusals."""

from __future__ import annotations

import json
import os

import torch

from chatlora.model.from_run import load_run
from chatlora.recipes.merge import merge


def test_merged_model_equals_the_adapter(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    lines: list[str] = []
    result = merge(str(tiny_run), str(tmp_path / "merged"), device="cpu", echo=lines.append)
    out = tmp_path / "merged"
    assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] <= 1e-3 and result["positions"] > 50
    assert any(line.startswith("parity on ") and "top-1 agreement 100.00%" in line for line in lines)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                 "chatlora_merge.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".merged*")), "no temporary folder left"
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask, "the umask's permissions, not 0600"
    assert GenerationConfig.from_pretrained(out).eos_token_id in (256, [256])  # <|im_end|>

    # An independent check: a fresh load of the merged folder vs base + adapter on a new input.
    adapter = load_run(tiny_run, device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "a new question"}], tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected, got = adapter.model(input_ids=ids).logits, merged(input_ids=ids).logits
        with adapter.model.disable_adapter():
            base = adapter.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (base - expected).abs().max() > 1e-3, "the adapter changes the logits, so the check means something"


def test_chatlora_merge_json_records_the_check(tiny_run, tmp_path):
    merge(str(tiny_run), str(tmp_path / "m"), dtype="bfloat16", device="cpu", echo=lambda _: None)
    record = json.loads((tmp_path / "m" / "chatlora_merge.json").read_text())
    assert record["dtype"] == "bfloat16" and record["max_diff_allowed"] == 1.0 and record["stop_tokens"] == ["<|im_end|>"]
    assert record["max_abs_diff"] <= 1.0 and record["top1_agreement"] >= 0.95
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
