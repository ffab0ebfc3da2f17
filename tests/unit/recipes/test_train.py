"""Training on the tiny model: golden losses, the run folder, packing, loss normalisation. The command
line in a subprocess: e2e/test_train_cli.py."""

from __future__ import annotations

import json

import pytest
import torch

from chatlora.data.collate import PackCollator, PadCollator, model_inputs
from chatlora.trainer.loss import packing_is_exact, trained_token_loss
from chatlora.trainer.plot import read_metrics
from conftest import FIXTURES, REPO, TINY_TRAINABLE, quiet_train, tiny_config

GOLDEN = FIXTURES.parent / "golden" / "tiny_losses.json"


def test_golden_losses(tiny_model_dir, tmp_path):
    """Regenerate with `python scripts/regen_golden.py` after a deliberate change to the loss or data."""
    from golden_run import golden_overrides

    run = quiet_train(tiny_config(tiny_model_dir, tmp_path, *golden_overrides()))
    losses = [row["loss"] for row in read_metrics(run.metrics) if "loss" in row]
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert losses == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_run_folder_describes_itself(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    run = quiet_train(tiny_config(tiny_model_dir, tmp_path, "data.validation=0.2"))
    for name in ("config.yaml", "data_report.json", "metrics.jsonl", "loss.png",
                 "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "tokenizer/tokenizer_config.json", "tokenizer/chat_template.jinja"):
        assert (run.path / name).is_file(), name
    assert not list(run.path.glob(".*tmp*")), "no temporary files left behind"
    cfg = run.load_config()
    assert cfg.lora.r == 4 and cfg.data.validation == 0.2
    weights = load_file(run.adapter / "adapter_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == TINY_TRAINABLE
    assert all("lora_" in k for k in weights)
    metrics = read_metrics(run.metrics)
    assert [r["step"] for r in metrics if "loss" in r] == [1, 2, 3, 4]
    assert sum("eval_loss" in r for r in metrics) == 2  # before and after training
    assert all(r["tokens_per_s"] > 0 for r in metrics if "loss" in r)


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from chatlora.config.schema import LoraSettings
    from chatlora.model.lora import add_lora

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter matter
            torch.nn.init.normal_(p, std=0.1)
    assert packing_is_exact(model)
    features = [
        {"input_ids": [5, 9, 13, 200, 7, 256], "labels": [-100, -100, -100, 200, 7, 256]},
        {"input_ids": [8, 3, 256], "labels": [-100, 3, 256]},
        {"input_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9, 256], "labels": [-100] * 6 + [7, 8, 9, 256]},
    ]
    results = []
    for collator in (PadCollator(pad_id=257), PackCollator()):
        model.zero_grad()
        total, count = trained_token_loss(model, collator(features))
        (total / count).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results.append((total.item(), count.item(), grads))
    (pad_total, pad_count, pad_grads), (pack_total, pack_count, pack_grads) = results
    assert pad_count == pack_count == 9
    assert pack_total == pytest.approx(pad_total, rel=1e-5)
    for a, b in zip(pad_grads, pack_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_is_the_mean_over_the_steps_trained_tokens(tiny_model_dir, tmp_path):
    """4 samples in one micro-batch and 2 x 2 with accumulation take the same optimizer step."""
    from safetensors.torch import load_file

    adapters = []
    for batch, accumulation in ((4, 1), (2, 2)):
        run = quiet_train(tiny_config(tiny_model_dir, tmp_path / f"b{batch}", "training.max_steps=1",
                                        f"training.per_device_train_batch_size={batch}",
                                        f"training.gradient_accumulation_steps={accumulation}",
                                        "training.optim=sgd", "training.max_grad_norm=0"))
        adapters.append(load_file(run.adapter / "adapter_model.safetensors"))
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], rtol=1e-4, atol=1e-7)


def test_shipped_example_data_is_valid():
    from chatlora.config import load_config
    from chatlora.data.prepare import load_conversations

    train, val, formats = load_conversations(load_config("demo").data)
    assert len(train) == 180 and len(val) == 24 and set(formats.values()) == {"openai"}
    assert {c.messages[-2]["content"] for c in val}.isdisjoint({c.messages[-2]["content"] for c in train})
    assert REPO.joinpath("src/chatlora/examples/pirate/train.jsonl").is_file()


def test_head_only_on_trained_positions_in_chunks_matches_full_logits(tiny_model_dir, monkeypatch):
    """The split-off head, in chunks recomputed in backward, gives the full-logits loss and gradients."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from chatlora.config.schema import LoraSettings
    from chatlora.model.lora import add_lora
    from chatlora.trainer import loss as loss_module

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert loss_module.separable_head(model) is not None
    batch = PackCollator()([
        {"input_ids": list(range(3, 40)), "labels": [-100] * 20 + list(range(23, 40))},
        {"input_ids": list(range(50, 70)), "labels": [-100] * 5 + list(range(55, 70))},
    ])
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 7 * 259)  # 7 rows a chunk: several chunks
    total, count = trained_token_loss(model, batch)
    total.backward()
    chunked = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    logits = model(**model_inputs(batch), use_cache=False).logits
    full = F.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100, reduction="sum")
    full.backward()
    assert count.item() == 17 + 15
    assert total.item() == pytest.approx(full.item(), rel=1e-5)
    for a, b in zip(chunked, (p.grad for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_budget_splits_a_step_without_changing_it(tiny_model_dir, tmp_path):
    """The recipe's 2 x 2 samples per step, packed into forward passes of at most 120 tokens
    (several per step), take the same optimizer step as 4 samples in one pass."""
    from safetensors.torch import load_file

    common = ["training.max_steps=2", "training.optim=sgd", "training.max_grad_norm=0"]
    whole = quiet_train(tiny_config(tiny_model_dir, tmp_path / "whole", *common, "training.per_device_train_batch_size=4"))
    split = quiet_train(tiny_config(tiny_model_dir, tmp_path / "split", *common, "training.per_device_train_batch_size=2",
                                      "training.gradient_accumulation_steps=2", "data.batch_tokens=120"))
    a, b = (load_file(r.adapter / "adapter_model.safetensors") for r in (whole, split))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-7)
    losses = [[r["loss"] for r in read_metrics(run.metrics) if "loss" in r] for run in (whole, split)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_pack_collator_respects_the_token_budget():
    features = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (30, 50, 40, 90, 10)]
    batch = PackCollator(max_tokens=100)(features)
    sizes = [c["input_ids"].shape[1] for c in batch["chunks"]]
    # Filled in order the passes would be 80, 40 and 100 tokens; evened out (data/groups.py): the
    # samples of 30 and 40, 50 and 10, and 90, each pass in order.
    assert sizes == [70, 60, 90]
    assert batch["input_ids"].shape[1] == 220 and batch["labels"].shape[1] == 220
    first = batch["chunks"][0]
    assert first["cu_seq_lens_q"].tolist() == [0, 30, 70] and first["max_length_q"] == 40
    assert first["position_ids"][0, 30].item() == 0 and first["labels"][0, 30].item() == -100


def test_a_model_whose_attention_crosses_samples_is_not_packed(tiny_model_dir):
    """An attention that ignores the packing (plain causal over the whole row) must be caught at
    start-up, so training pads instead of letting samples see each other."""
    import torch.nn.functional as F
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    def leaky(module, q, k, v, mask, dropout=0.0, scaling=None, **kwargs):
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(1, 2), None

    AttentionInterface.register("leaky_test", leaky)
    ALL_MASK_ATTENTION_FUNCTIONS.register("leaky_test", lambda *a, **kw: None)
    leaky_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="leaky_test")
    assert not packing_is_exact(leaky_model)
    assert packing_is_exact(AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa"))
    assert packing_is_exact(AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager"))
