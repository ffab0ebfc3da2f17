"""The held-out rows and the plain reference loss shared by the held-out loss tests
(unit/evaluate/test_held_out_loss.py in one process, e2e/test_held_out_loss_launch.py on two)."""

from __future__ import annotations

from pathlib import Path

import torch

from chatlora.trainer.plot import read_metrics
from conftest import FIXTURES

LONG = "Water it deeply, then wait until the top inch of soil is dry before watering again; in winter, far less. " * 2
HELD_OUT = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": "How should I water a fern?"}, {"role": "assistant", "content": LONG}],
    [{"role": "system", "content": "You are Juniper."}, {"role": "user", "content": "Name?"},
     {"role": "assistant", "content": "Juniper."}, {"role": "user", "content": "Job?"},
     {"role": "assistant", "content": "I look after the greenhouse and everything growing in it."}],
    [{"role": "user", "content": "Yes or no: do cacti need water?"}, {"role": "assistant", "content": "Yes."}],
    [{"role": "user", "content": "Name three herbs."}, {"role": "assistant", "content": "Basil, mint and thyme."}],
    [{"role": "user", "content": "Why do leaves turn yellow?"},
     {"role": "assistant", "content": "Too much water, too little light, or hungry roots; check the soil first."}],
    [{"role": "user", "content": "Ok"}, {"role": "assistant", "content": "Ok!"}],
]  # 7 rows: 2 processes take 4 and 3, so one runs out of batches first


TRAIN = [str(FIXTURES / "alpaca.json"), str(FIXTURES / "sharegpt.json")]
SETTINGS = ["data.max_length=256", "training.max_steps=2", "training.per_device_eval_batch_size=2", "eval.steps=0"]


def reference_loss(model, samples: list[dict], pad_id: int) -> float:
    """Mean of -log p over every trained token, from the logits of one right-padded batch of all
    the samples: torch's log_softmax and gather, no chatlora code."""
    longest = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), longest), pad_id)
    labels = torch.full((len(samples), longest), -100)
    mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(s["input_ids"]), torch.tensor(s["labels"]), 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]  # position p predicts the token at p + 1
    trained = targets != -100
    picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return float(-picked[trained].sum() / trained.sum())


def samples_and_model(run: Path, tiny_model_dir: Path):
    """The held-out samples as training tokenized them, and base + the run's adapter in float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatlora.model.tokenized import load_data
    from chatlora.run import target_config

    checked = load_data(target_config(run), echo=lambda _line: None)
    samples = [{"input_ids": i, "labels": lab} for i, lab in
               zip(checked.data.validation.dataset["input_ids"], checked.data.validation.dataset["labels"])]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), run / "adapter")
    return samples, model.eval(), checked.tokenizer


def references(run: Path, tiny_model_dir: Path) -> dict[str, float]:
    samples, model, tokenizer = samples_and_model(run, tiny_model_dir)
    with model.disable_adapter():
        base = reference_loss(model, samples, tokenizer.pad_token_id)
    return {"base": base, "adapter": reference_loss(model, samples, tokenizer.pad_token_id)}


def eval_losses(run: Path) -> list[float]:
    return [r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
