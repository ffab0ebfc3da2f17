"""GPU paths: varlen attention on packed rows. Skipped without a CUDA device (run them on one with
`pytest -m gpu`)."""

from __future__ import annotations

import pytest
import torch

from chatlora.data.collate import PackCollator, PadCollator, model_inputs
from chatlora.model import attention
from chatlora.model.loss import packing_is_exact, trained_token_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not attention.available(), reason="needs CUDA and torch varlen attention")]


def tiny_bf16(tiny_model_dir, attn: str):
    from transformers import AutoModelForCausalLM

    from chatlora.config.schema import LoraSettings
    from chatlora.model.lora import add_lora

    attention.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, attn_implementation=attn, device_map="cuda")
    model = add_lora(model, LoraSettings(r=4, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


FEATURES = [
    {"input_ids": list(range(3, 90)), "labels": [-100] * 40 + list(range(43, 90))},
    {"input_ids": list(range(100, 131)), "labels": [-100] * 10 + list(range(110, 131))},
    {"input_ids": list(range(7, 70)), "labels": [-100] * 30 + list(range(37, 70))},
]


def to_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def test_varlen_packed_logits_equal_each_sample_alone(tiny_model_dir):
    model = tiny_bf16(tiny_model_dir, attention.NAME)
    assert packing_is_exact(model)
    packed = to_cuda(PackCollator()(FEATURES))
    with torch.no_grad():
        together = model(**model_inputs(packed), use_cache=False).logits[0]
        start = 0
        for f in FEATURES:
            alone = model(input_ids=torch.tensor([f["input_ids"]], device="cuda"), use_cache=False).logits[0]
            part = together[start : start + len(f["input_ids"])]
            torch.testing.assert_close(part.float(), alone.float(), rtol=2e-2, atol=2e-2)
            start += len(f["input_ids"])


def test_varlen_packed_loss_and_grads_equal_padded_sdpa(tiny_model_dir):
    results = []
    for attn, collator in ((attention.NAME, PackCollator()), ("sdpa", PadCollator(pad_id=257))):
        model = tiny_bf16(tiny_model_dir, attn)
        total, count = trained_token_loss(model, to_cuda(collator(FEATURES)))
        (total / count).backward()
        results.append((total.item(), [p.grad.float() for p in model.parameters() if p.requires_grad]))
    (a_loss, a_grads), (b_loss, b_grads) = results
    assert a_loss == pytest.approx(b_loss, rel=1e-2)
    for a, b in zip(a_grads, b_grads):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_shared_prompt_pairs_on_the_varlen_kernel_equal_the_prompt_twice(tiny_model_dir):
    """data/collate.py pack_shared on the real kernel: each reply sees its prompt and itself only
    (causal from the bottom right), so its log-probabilities and their gradients are those of the
    row that holds the prompt twice. tests/unit/model/test_shared_prompt.py checks the rest on a CPU."""
    from chatlora.data.collate import PreferenceCollator
    from chatlora.model.preference import sequence_logps

    pairs = [{"input_ids": f["input_ids"], "labels": f["labels"], "rejected_input_ids": f["input_ids"][:h] + list(range(150, 150 + n)),
              "rejected_labels": [-100] * h + list(range(150, 150 + n))} for f, h, n in zip(FEATURES, (40, 10, 30), (25, 60, 7))]
    results = []
    for share in (None, "varlen"):
        model = tiny_bf16(tiny_model_dir, attention.NAME)
        batch = to_cuda(PreferenceCollator(share)(pairs))
        logps = sequence_logps(model, batch)[0]
        logps.sum().backward()
        results.append((logps.float(), [p.grad.float() for p in model.parameters() if p.requires_grad], batch["input_ids"].shape[1]))
    (a, a_grads, a_len), (b, b_grads, b_len) = results
    assert b_len == a_len - (40 + 10 + 30)
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0.5)
    for x, y in zip(b_grads, a_grads):
        assert (x - y).norm() <= 0.05 * y.norm() + 1e-6


def test_training_on_gpu_with_a_token_budget(tiny_model_dir, tmp_path):
    from chatlora.recipes.train import train
    from conftest import tiny_config

    lines: list[str] = []
    run = train(tiny_config(tiny_model_dir, tmp_path, "model.dtype=bfloat16", "data.batch_tokens=200",
                            "training.bf16=true", "training.gradient_accumulation_steps=2"), lines.append)
    assert any(f"attention: {attention.NAME}" in line for line in lines)
    assert (run.adapter / "adapter_model.safetensors").is_file()


def test_cuda_graph_decode_equals_the_same_steps_without_graphs(tiny_model_dir):
    """The recorded graphs replay exactly what the static cache computes eagerly (same kernels, same
    inputs), for rows that join and leave, across batch and length buckets."""
    from transformers import AutoModelForCausalLM

    from chatlora.generate.decode import StaticDecoder, parity
    from decoding import greedy_rows

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16, device_map="cuda").eval()
    prompts = [[5, 6, 7, 8, 9], [100, 20, 30], list(range(40, 60))]

    def run(mode: str) -> list[list[int]]:
        decoder = StaticDecoder(model, slots=4, columns=160, mode=mode)
        if mode == "graphs":
            assert parity(decoder) < 0.1
            assert decoder.warm_up() > 0
        out, _ = greedy_rows(decoder, joins={i: i for i in range(len(prompts))}, limits={i: 60 + 20 * i for i in range(len(prompts))},
                             prompts=prompts)
        return [out[i] for i in range(len(prompts))]

    assert run("graphs") == run("static")


def test_training_on_a_4bit_base(wide_model_dir, tmp_path):
    """QLoRA on CUDA: the decoder layers in NF4, a few steps, the adapter saved (bitsandbytes needed)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from chatlora.model.from_run import load_run
    from chatlora.recipes.train import train
    from conftest import tiny_config

    lines: list[str] = []
    run = train(tiny_config(wide_model_dir, tmp_path, "model.quantize=nf4", "model.dtype=bfloat16", "training.bf16=true",
                            "training.gradient_checkpointing=true", "training.max_steps=3"), lines.append)
    assert any("4-bit NF4 layers" in line for line in lines)
    assert (run.adapter / "adapter_model.safetensors").is_file()
    loaded = load_run(run.path, "cuda")
    assert isinstance(loaded.model.get_base_model().model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
