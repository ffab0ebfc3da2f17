"""Each chat-model family's architecture, tiny (tests/families.py), through chatlora's own paths on
the CPU in float32: packed rows give the loss and gradients of padded batches, gradient
checkpointing changes neither, the adapter's default targets are the family's own layers, the
static-cache decoder gives transformers' greedy tokens one for one (sliding windows and latent
attention included). A short `train` then `merge` with parity, per family: e2e/test_families_train_merge.py. Where a fast path cannot hold (Gemma
2's soft-capped attention and packing), chatlora says so by name and takes the other path. The GPU
paths (varlen attention, CUDA graphs, Liger) are in test_gpu_families.py."""

from __future__ import annotations

import pytest
import torch

from chatlora.config.schema import LoraSettings
from chatlora.data.collate import PackCollator, PadCollator
from chatlora.generate.decode import StaticDecoder, fast_decoder
from chatlora.model.lora import add_lora, unmatched_targets
from chatlora.model.loss import packing_is_exact, trained_token_loss
from families import ADAPTED, ATTENTION, MLP, UNMATCHED, WINDOW, save_family
from decoding import greedy_rows

# Three samples, one longer than the families' sliding window (8 tokens).
FEATURES = [
    {"input_ids": [5, 9, 13, 200, 7, 256], "labels": [-100, -100, -100, 200, 7, 256]},
    {"input_ids": [8, 3, 256], "labels": [-100, 3, 256]},
    {"input_ids": list(range(1, 21)) + [256], "labels": [-100] * 12 + list(range(13, 21)) + [256]},
]
PROMPTS = [[5, 6, 7, 8, 9], list(range(40, 60))]


# one_thread and family: tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_thread")


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)  # float32, the family's default attention


def with_adapter(folder, gradient_checkpointing: bool = False):
    """The model with chatlora's default adapter (all-linear), its B matrices drawn so that it matters."""
    model = load(folder)
    torch.manual_seed(0)  # peft draws the A matrices: the same ones at every call, whatever ran before
    model = add_lora(model, LoraSettings(r=4, dropout=0.0), gradient_checkpointing)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def loss_and_grads(model, batch: dict) -> tuple[float, int, list[torch.Tensor]]:
    model.zero_grad()
    total, count = trained_token_loss(model, batch)
    (total / count).backward()
    return total.item(), int(count), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same(a, b) -> None:
    assert a[1] == b[1] == 14  # trained tokens
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    for x, y in zip(a[2], b[2]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_the_default_adapter_targets_the_familys_own_layers(family):
    from peft.tuners.lora import LoraLayer

    name, folder = family
    model = with_adapter(folder)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoraLayer)} - {"base_layer"}
    assert adapted == ADAPTED.get(name, ATTENTION | MLP)
    # A list written for Llama-style layers: what it misses in a fused family is named at training.
    llama_style = sorted(ATTENTION | MLP)
    listed = add_lora(load(folder), LoraSettings(r=4, dropout=0.0, target_modules=llama_style))
    assert unmatched_targets(listed, llama_style) == sorted(UNMATCHED.get(name, ()))


def test_dropout_on_fused_experts_is_refused_with_the_fix(tmp_path):
    """peft cannot drop out the input of an MoE model's fused experts (all-linear adapts them): one
    error naming the setting and the fix, not peft's ValueError."""
    from chatlora.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora.dropout=0.1: peft cannot apply dropout to the fused expert weights of "
                                          r"this mixtral model, .*set lora.dropout=0"):
        add_lora(load(save_family(tmp_path, "mixtral")), LoraSettings(r=4, dropout=0.1))


def test_packed_rows_give_the_loss_and_gradients_of_padded_batches(family):
    """Under the family's own attention (sdpa, or eager for Gemma 2) on the CPU: transformers' block
    mask for packed rows, with each family's windows, caps and rotary variants."""
    _, folder = family
    model = with_adapter(folder)
    assert packing_is_exact(model)
    assert_same(loss_and_grads(model, PadCollator(pad_id=257)(FEATURES)), loss_and_grads(model, PackCollator()(FEATURES)))


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(family):
    _, folder = family
    plain = loss_and_grads(with_adapter(folder), PackCollator()(FEATURES))
    model = with_adapter(folder, gradient_checkpointing=True)
    model.gradient_checkpointing_enable()  # what Trainer does with training.gradient_checkpointing=true
    model.train()
    assert model.base_model.model.is_gradient_checkpointing
    model.config.use_cache = False
    assert_same(plain, loss_and_grads(model, PackCollator()(FEATURES)))


def test_fast_decode_equals_generate(family):
    """Greedy tokens of the static cache (rows joining, leaving and the cache shifting, in 44 columns)
    equal transformers' generate alone; fast_decoder checks and takes the fast path."""
    name, folder = family
    model = load(folder).eval()
    want = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=None)
        want.append(out[0, len(prompt):].tolist())
    decoder = StaticDecoder(model, slots=2, columns=44, mode="static")
    assert decoder.window == (WINDOW if name in ("gemma2", "gemma3_text", "mistral") else None)
    # The long prompt first; the short one joins at step 3 and outlives it, past the cache's end.
    got, shifted = greedy_rows(decoder, joins={0: 1, 3: 0}, limits={0: 24, 1: 24}, prompts=PROMPTS)
    assert shifted and [got[0], got[1]] == want
    lines: list[str] = []
    assert fast_decoder(model, "static", columns=64, echo=lines.append) is not None
    assert lines[0].startswith("decode: static, static cache of 1 x 64 tokens, checked")
