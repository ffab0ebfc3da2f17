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


def test_zero_grad_drops_the_trained_gradients(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    trained = walks.trainable(model)
    walks.zero_trained_grads_only(model, trained)
    ids = torch.randint(0, 200, (1, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in trained)
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=False)  # the other way: the full walk, gradients zeroed in place
    assert all(p.grad is not None and not p.grad.any() for p in trained)


@pytest.mark.parametrize("clipped", [True, False])
def test_guard_reads_the_norm_trainer_took(tiny_model_dir, tmp_path, clipped):
    from transformers import TrainerState, TrainingArguments

    from chatlora.errors import NonFiniteError
    from chatlora.trainer.guard import NonFiniteGuard
    from chatlora.trainer.trainer import ChatTrainer

    model = lora_model(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_grad_norm=1.0 if clipped else 0.0)
    trainer = ChatTrainer(model=model, args=args)
    trainer.losses_finite = None
    guard = NonFiniteGuard(trainer, "stop", print)
    state = TrainerState(global_step=3, max_steps=10)
    ids = torch.randint(0, 200, (1, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    take = trainer._clip_grad_norm if clipped else trainer._get_grad_norm
    take(model)
    assert torch.is_tensor(trainer.step_grad_norm)
    guard.on_pre_optimizer_step(args, state, None)  # finite: goes on, and the norm is used up
    assert trainer.step_grad_norm is None

    trainer.trainable()[0].grad[0, 0] = float("inf")  # the loss was finite; one gradient is not
    take(model)
    with pytest.raises(NonFiniteError, match="step 4 of 10: the gradient norm was NaN or inf"):
        guard.on_pre_optimizer_step(args, state, None)
    trainer.step_grad_norm = None  # no norm taken this step: the guard checks the gradients itself
    trainer.trainable()[0].grad[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        guard.on_pre_optimizer_step(args, state, None)


def test_the_model_gets_its_own_methods_back_after_training(tiny_model_dir, tmp_path, monkeypatch):
    import copy

    from transformers import TrainingArguments

    from chatlora.data.collate import PadCollator
    from chatlora.trainer.trainer import ChatTrainer

    model = lora_model(tiny_model_dir)
    rows = [{"input_ids": list(range(3, 12)), "labels": list(range(3, 12))} for _ in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2,
                             per_device_train_batch_size=2, save_strategy="no", remove_unused_columns=False)
    trainer = ChatTrainer(model=model, args=args, train_dataset=rows, data_collator=PadCollator(0))
    seen = []
    original = ChatTrainer.training_step

    def spy(self, model_, inputs, num_items_in_batch=None):
        loss = original(self, model_, inputs, num_items_in_batch)
        seen.append({"train", "zero_grad"} <= set(vars(model)))
        return loss

    monkeypatch.setattr(ChatTrainer, "training_step", spy)
    trainer.train()
    assert seen == [True, True]  # the shortcuts were on while it trained
    assert "train" not in vars(model) and "zero_grad" not in vars(model)
    twin = copy.deepcopy(model)
    twin.eval()
    assert model.training and not twin.training
