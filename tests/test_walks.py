"""trainer/walks.py: Trainer's per-step bookkeeping from lists made once gives what the full walks
of the model give (modes, input casting, FLOPs, gradient norms)."""

from __future__ import annotations

import pytest
import torch

from chatlora.trainer import walks


def lora_model(folder, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return get_peft_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], **lora))


def test_train_returns_at_once_only_when_every_module_is_in_that_mode(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    assert walks.skip_unchanged_train(model)
    dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    dropout.eval()  # one module out of step (a callback, say): the full walk puts it back
    assert model.train() is model and dropout.training
    # A wrapper's walk (DDP's, Module.eval's) reaches the shortcut through its children.
    outer = torch.nn.Sequential(model)
    outer.eval()
    assert not dropout.training and not model.training
    outer.train()
    assert dropout.training


def test_train_keeps_the_full_walk_when_a_module_does_more(tiny_model_dir):
    model = lora_model(tiny_model_dir, use_dora=True)  # DoRA layers clear a cache at every train(True)
    assert not walks.skip_unchanged_train(model)
    assert "train" not in vars(model)


def test_input_casting_switched_as_peft_switches_it(tiny_model_dir):
    from peft.helpers import disable_input_dtype_casting

    model = lora_model(tiny_model_dir)
    layers = walks.tuner_layers(model)
    assert layers and all(layer.cast_input_dtype_enabled for layer in layers)
    layers[0].cast_input_dtype_enabled = False  # as it was before: restored as it was
    with walks.no_input_casting(layers):
        ours = [layer.cast_input_dtype_enabled for layer in layers]
    after = [layer.cast_input_dtype_enabled for layer in layers]
    with disable_input_dtype_casting(model):
        theirs = [layer.cast_input_dtype_enabled for layer in layers]
    assert ours == theirs == [False] * len(layers)
    assert after == [False] + [True] * (len(layers) - 1) == [layer.cast_input_dtype_enabled for layer in layers]
    with walks.no_input_casting(layers, active=False):
        assert [layer.cast_input_dtype_enabled for layer in layers] == after


def test_trainer_bookkeeping_equals_the_full_walks(tiny_model_dir, tmp_path, byte_tokenizer):
    from transformers import Trainer, TrainingArguments

    from chatlora.trainer.trainer import ChatTrainer

    model = lora_model(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_grad_norm=0.5)
    trainer = ChatTrainer(model=model, args=args)
    batch = {"input_ids": torch.ones(2, 7, dtype=torch.long)}
    assert trainer.floating_point_ops(batch) == Trainer.floating_point_ops(trainer, batch) > 0
    assert trainer.trainable() == [p for p in model.parameters() if p.requires_grad]
    assert trainer.local_clipping()

    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad.clone() for p in trainer.trainable()]
    norm = trainer._get_grad_norm(model)  # max_grad_norm <= 0: the norm alone
    clipped = trainer._clip_grad_norm(model)
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert float(norm) == pytest.approx(float(expected)) and float(clipped) == pytest.approx(float(expected))
    scale = min(1.0, 0.5 / (float(expected) + 1e-6))
    for p, g in zip(trainer.trainable(), grads):
        torch.testing.assert_close(p.grad, g * scale)
