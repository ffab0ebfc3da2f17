"""One held-out loss (evaluate/loss.py): training's evaluation, `chatlora eval` and merge report the
same number for the same adapter and data, whatever the batch size, packing, token budget or number
of processes, and it equals a plain sum of token log-probabilities written here, apart from chatlora.

The held-out rows differ in length (one-word replies, a long reply, several turns), so that a mean of
per-batch means, which Trainer's own evaluation takes, is off by far more than the 1e-6 allowed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import tiny_config
from held_out import HELD_OUT, SETTINGS, TRAIN, eval_losses, reference_loss, references, samples_and_model


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("held-out") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in HELD_OUT))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory, held_out_file) -> Path:
    from chatlora.recipes.train import train

    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tiny_model_dir, tmp, f"data.train=[{','.join(TRAIN)}]", f"data.validation={held_out_file}", *SETTINGS)
    return train(cfg, echo=lambda _line: None).path


def test_every_trained_token_counts_the_end_of_turn_token_too(run, tiny_model_dir):
    samples, _model, tokenizer = samples_and_model(run, tiny_model_dir)
    assert len(samples) == len(HELD_OUT)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for s, messages in zip(samples, HELD_OUT):  # each reply's tokens and the token that ends it
        replies = sum(m["role"] == "assistant" for m in messages)
        assert s["labels"].count(end) == replies and s["labels"][-1] == end


def test_training_and_chatlora_eval_equal_the_reference(run, tiny_model_dir, tmp_path):
    """Training's before/after loss (packed, 2 rows per evaluation batch) and `chatlora eval`'s
    (padded, at several batch sizes) equal the reference, for the base model and the adapter."""
    from chatlora.recipes.eval import evaluate

    ref = references(run, tiny_model_dir)
    assert ref["adapter"] < ref["base"]
    before, after = eval_losses(run)
    assert before == pytest.approx(ref["base"], abs=1e-6)
    assert after == pytest.approx(ref["adapter"], abs=1e-6)
    for batch_size in (1, 3, 8):
        report = evaluate(str(run), max_new_tokens=1, batch_size=batch_size, out=str(tmp_path / str(batch_size)),
                          device="cpu", echo=lambda _line: None)
        for side in ("base", "adapter"):
            got = report["results"][side]
            assert got["loss"] == pytest.approx(ref[side], abs=1e-6), (batch_size, side)
            assert got["perplexity"] == pytest.approx(math.exp(ref[side]), rel=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
@pytest.mark.parametrize("collation", ["padded", "packed", "token budget"])
def test_training_evaluation_does_not_depend_on_batching(run, tiny_model_dir, tmp_path, batch_size, collation):
    """ChatTrainer.evaluate(), the evaluation training runs, on the run's adapter: padded batches,
    packed rows, and packed rows split into passes by a 64-token budget (several passes per batch)."""
    from transformers import TrainingArguments

    from chatlora.data.collate import PackCollator, PadCollator
    from chatlora.trainer.trainer import ChatTrainer

    samples, model, tokenizer = samples_and_model(run, tiny_model_dir)
    collator = {"padded": PadCollator(tokenizer.pad_token_id), "packed": PackCollator(),
                "token budget": PackCollator(max_tokens=64)}[collation]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_eval_batch_size=batch_size, report_to="none",
                             use_cpu=True, remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True)
    trainer = ChatTrainer(model=model, args=args, eval_dataset=samples, data_collator=collator, processing_class=tokenizer)
    got = trainer.evaluate()["eval_loss"]
    assert got == pytest.approx(reference_loss(model, samples, tokenizer.pad_token_id), abs=1e-6)


def test_merge_reports_the_same_loss(run, tiny_model_dir, tmp_path):
    """merge's parity rows (all 7 held-out rows here): the adapter's loss is eval's, and the merged
    model's equals it."""
    from chatlora.recipes.merge import merge

    result = merge(str(run), str(tmp_path / "merged"), device="cpu", echo=lambda _line: None)
    held = result["held_out_loss"]
    assert held["rows"] == len(HELD_OUT)
    ref = references(run, tiny_model_dir)["adapter"]
    assert held["adapter"] == pytest.approx(ref, abs=1e-6)
    assert held["merged"] == pytest.approx(ref, abs=1e-5)  # W + BA rounds differently from Wx + B(Ax)
    saved = json.loads((tmp_path / "merged" / "chatlora_merge.json").read_text())
    assert saved["held_out_loss"] == held


def test_chatlora_eval_leaves_out_what_training_drops(run, tiny_model_dir, tmp_path):
    """A reply alone longer than data.max_length is dropped (the run's data.overlong=drop) from the
    loss, as training drops it, and said so; the loss of the rest is unchanged."""
    from chatlora.recipes.eval import evaluate

    data = tmp_path / "more.jsonl"
    rows = HELD_OUT + [[{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "x" * 300}]]
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    lines: list[str] = []
    report = evaluate(str(run), str(data), max_new_tokens=1, out=str(tmp_path / "r"), device="cpu", echo=lines.append)
    assert report["loss_rows"] == len(HELD_OUT) and report["rows"] == len(rows)
    assert report["results"]["adapter"]["loss"] == pytest.approx(references(run, tiny_model_dir)["adapter"], abs=1e-6)
    assert "note: 1 of 8 conversations are left out of the held-out loss: a reply alone is longer than data.max_length=256" in lines
