"""The LoRA variants (lora.use_dora, use_rslora, init, plus_lr_ratio, modules_to_save,
layers_to_transform; training.neftune_noise_alpha), one table of cases on the tiny model as peft's own
tests do: each trains (the loss falls), resumes exactly (3 steps + resume + 3 steps == 6 steps, bit for
bit), saves an adapter that reproduces the trained model when a later command loads it, and merges
within merge's parity check. The refusals are in unit/model/test_lora_options.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from chatlora.errors import Preempted
from chatlora.model.from_run import load_run
from chatlora.recipes.merge import merge
from conftest import losses, quiet_train, tiny_config
from exact_resume import SETTINGS, SignalAt, adapter, assert_same_as

CASES = {
    "dora": ["lora.use_dora=true"],
    "rslora-gaussian": ["lora.use_rslora=true", "lora.init=gaussian"],
    "pissa": ["lora.init=pissa"],
    "olora": ["lora.init=olora"],
    "loraplus": ["lora.plus_lr_ratio=16"],
    "neftune": ["training.neftune_noise_alpha=5"],
    "modules-layers": ["lora.modules_to_save=[lm_head]", "lora.layers_to_transform=[1]"],
}
PROMPT = torch.tensor([list(b"<|im_start|>user\nwho are you?<|im_end|>\n<|im_start|>assistant\n")[:40]])


class FinalLogits(TrainerCallback):
    """The trained model's logits on PROMPT when training ends, as the trainer holds it (PiSSA/OLoRA:
    the residual base weights with the unconverted adapter)."""

    logits: torch.Tensor | None = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            self.logits = model(input_ids=PROMPT).logits.float()
        model.train(was_training)


@pytest.mark.parametrize("case", list(CASES))
def test_variant_trains_resumes_exactly_and_merges(case, tiny_model_dir, tmp_path, uninterrupted_run):
    overrides = [*SETTINGS, *CASES[case]]
    final = FinalLogits()
    full = quiet_train(tiny_config(tiny_model_dir, tmp_path / "full", *overrides), callbacks=[final])
    steps = losses(full)
    assert len(steps) == 6 and steps[-1] < steps[0], steps
    assert steps != uninterrupted_run["losses"], "the variant changed training (the same run with plain LoRA)"
    reference = {"losses": steps, "adapter": adapter(full.path)}
    saved = json.loads((full.path / "adapter" / "adapter_config.json").read_text())
    if case in ("pissa", "olora"):  # converted: a plain LoRA of twice the rank over the original base
        assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    if case == "modules-layers":
        assert "base_model.model.lm_head.weight" in reference["adapter"]  # the trained copy
        assert not any(".layers.0." in k for k in reference["adapter"])

    cut = tiny_config(tiny_model_dir, tmp_path / "cut", *overrides)
    with pytest.raises(Preempted):
        quiet_train(cut, callbacks=[SignalAt(3)])
    quiet_train(tiny_config(tiny_model_dir, tmp_path / "cut", *overrides, "resume=auto"))
    assert_same_as(reference, tmp_path / "cut" / "run")

    # What chat, eval and serve load is the model that training ended with.
    loaded = load_run(full.path, device="cpu")
    with torch.no_grad():
        got = loaded.model(input_ids=PROMPT).logits.float()
        with loaded.model.disable_adapter():
            base = loaded.model(input_ids=PROMPT).logits.float()
    torch.testing.assert_close(got, final.logits, rtol=1e-4, atol=1e-4)
    assert (got - base).abs().max() > 1e-3, "training changed the model"

    result = merge(str(full.path), str(tmp_path / "merged"), device="cpu", echo=lambda _: None)
    assert result["max_abs_diff"] <= 1e-3 and result["top1_agreement"] == 1.0, result
