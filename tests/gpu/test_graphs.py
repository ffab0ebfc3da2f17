"""CUDA graphs over the training pass (trainer/graphs.py): what the CPU can check, and the GPU runs.

The rows a graph replays are padded (PackCollator's pad_to); padding must not change the loss or a
gradient. Recording and replaying need a GPU: those tests are marked gpu (`pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from chatlora.data.collate import PackCollator
from chatlora.trainer.loss import trained_token_loss
from chatlora.trainer.plot import read_metrics
from conftest import losses, tiny_config

FEATURES = [
    {"input_ids": list(range(3, 40)), "labels": [-100] * 20 + list(range(23, 40))},
    {"input_ids": list(range(50, 70)), "labels": [-100] * 5 + list(range(55, 70))},
    {"input_ids": list(range(80, 91)), "labels": [-100] * 11},  # nothing trained
]


def tiny_lora(tiny_model_dir, **load):
    from transformers import AutoModelForCausalLM

    from chatlora.config.schema import LoraSettings
    from chatlora.model.lora import add_lora

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, **load), LoraSettings(r=4, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_padded_row_trains_exactly_as_the_row_itself(tiny_model_dir):
    """A row padded by a sample of its own, with its trained positions padded by a position that has
    no target, gives the same loss, count and gradients as the row unpadded."""
    model = tiny_lora(tiny_model_dir, attn_implementation="sdpa")
    plain, padded = PackCollator()(FEATURES), PackCollator(pad_to=64)(FEATURES)
    assert padded["input_ids"].shape[1] == 128 and plain["input_ids"].shape[1] == 68
    assert padded["cu_seq_lens_q"].tolist() == [0, 37, 57, 68, 128] and padded["max_length_q"] == 128
    assert padded["trained_positions"].numel() == 32  # 32 trained: a quarter of the row, none added
    assert plain["trained_positions"].tolist() == list(range(19, 36)) + list(range(41, 56))  # position p predicts p + 1
    results = []
    for batch in (plain, padded):
        model.zero_grad()
        total, count = trained_token_loss(model, batch)
        total.backward()
        results.append((total.item(), count.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (a_loss, a_count, a_grads), (b_loss, b_count, b_grads) = results
    assert a_count == b_count == 32
    assert a_loss == pytest.approx(b_loss, rel=1e-5)
    for a, b in zip(a_grads, b_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_trained_positions_are_padded_to_quarters_of_the_row_with_a_position_without_target():
    batch = PackCollator(pad_to=16)([{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]}])
    keep = batch["trained_positions"].tolist()
    assert keep[:3] == [1, 2, 3] and len(keep) == 4  # a quarter of 16
    assert keep[3] == 14 and batch["labels"][0, 15].item() == -100  # 14 predicts position 15: padding
    many = PackCollator(pad_to=16)([{"input_ids": list(range(1, 12)), "labels": list(range(1, 12))}])
    assert many["trained_positions"].numel() == 12  # 10 trained: three quarters
    assert batch["input_ids"][0, 5:].tolist() == [0] * 11
    padded_with = PackCollator(pad_to=16, pad_id=257)([{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]}])
    assert padded_with["input_ids"][0, 5:].tolist() == [257] * 11  # Trainer's count of real tokens leaves it out
    nothing = PackCollator(pad_to=16)([{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}])
    assert nothing["trained_positions"].tolist() == [14] * 4  # never an empty tensor (a shape of its own)


def test_gpu_settings_without_a_gpu_train_on_with_a_note(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the gpu tests cover it (here and in test_kernels.py)")
    from chatlora.recipes.train import train

    lines: list[str] = []
    run = train(tiny_config(tiny_model_dir, tmp_path, "model.cuda_graphs=true", "model.kernels=liger", "training.max_steps=2"),
                lines.append)
    assert "note: model.cuda_graphs ignored: it needs a CUDA GPU" in lines
    assert "note: model.kernels=liger ignored: it needs a CUDA GPU" in lines
    assert (run.adapter / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager-layers", "compiled-layers"])
def test_replayed_passes_train_as_eager_ones(tiny_model_dir, tmp_path, compiled, monkeypatch):
    """10 steps of 4 samples, the first 3 eager, then replayed from recorded graphs: the same losses
    and adapter as the same run with no graphs (bf16 on the GPU: within its rounding). The tokens
    seen, read back late (ChatTrainer._track_num_input_tokens), are Trainer's own count at once."""
    from safetensors.torch import load_file
    from transformers import Trainer

    from chatlora.recipes.train import train
    from chatlora.trainer.trainer import ChatTrainer

    common = ["model.dtype=bfloat16", "training.bf16=true", "training.max_steps=10", "training.per_device_train_batch_size=4",
              "training.learning_rate=1e-3", *(["model.compile=layers"] if compiled else [])]
    lines: list[str] = []
    graphed = train(tiny_config(tiny_model_dir, tmp_path / "graphs", *common, "model.cuda_graphs=true"), lines.append)
    monkeypatch.setattr(ChatTrainer, "_track_num_input_tokens", Trainer._track_num_input_tokens)
    plain = train(tiny_config(tiny_model_dir, tmp_path / "plain", *common), lambda _line: None)
    seen = [[r["tokens_seen"] for r in read_metrics(run.metrics) if "tokens_seen" in r] for run in (graphed, plain)]
    assert seen[0] == seen[1] and len(seen[0]) == 10, seen
    summary = [line for line in lines if line.startswith("cuda graphs:") and "passes replayed" in line]
    assert summary and "7 passes replayed" in summary[0] and "3 eager" in summary[0], lines
    assert losses(graphed) == pytest.approx(losses(plain), rel=2e-2)
    a, b = (load_file(r.adapter / "adapter_model.safetensors") for r in (graphed, plain))
    for key in a:
        assert (a[key].float() - b[key].float()).norm() <= 0.03 * b[key].float().norm() + 1e-6, key


def test_gradients_accumulate_into_the_runs_own_tensors():
    """The tensors recorded passes add into stay on the parameters: zeroed when a step starts (every
    gradient dropped, as Trainer's zero_grad does), kept within a step, and a gradient put there by
    someone else (a callback) is copied in rather than lost."""
    from chatlora.trainer.graphs import PassGraphs

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    graphs = PassGraphs(params)
    graphs._attach_grads()
    mine = [p.grad for p in params]
    assert all(g is not None and not g.any() for g in mine)
    for p in params:
        p.grad.add_(1.0)  # a pass
    graphs._attach_grads()  # a second pass of the same step: kept
    assert all(p.grad is g and (g == 1).all() for p, g in zip(params, mine))
    for p in params:
        p.grad = None  # the step ended
    graphs._attach_grads()
    assert all(p.grad is g and not g.any() for p, g in zip(params, mine))
    params[0].grad = torch.full((3,), 5.0)  # someone else's tensor
    params[1].grad = None
    graphs._attach_grads()
    assert params[0].grad is mine[0] and (mine[0] == 5).all()
    assert params[1].grad is mine[1] and not mine[1].any()
