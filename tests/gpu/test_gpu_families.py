"""The GPU paths for each family's tiny architecture (tests/families.py), in bfloat16: varlen
attention on packed rows (sliding windows and latent attention included) against sdpa on padded
batches, the training pass replayed from a CUDA graph, the decode step replayed from CUDA graphs, and
Liger's kernels where Liger has them. Gemma 2 keeps transformers' eager attention (soft-capping).
Skipped without a CUDA device (run them on one with `pytest -m gpu`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from chatlora.config.schema import LoraSettings, ModelConfig
from chatlora.data.collate import PackCollator, PadCollator
from chatlora.model import attention
from chatlora.model.lora import add_lora
from chatlora.model.loss import packing_is_exact, trained_token_loss
from families import FAMILIES, save_family

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not attention.available(), reason="needs CUDA and torch varlen attention")]

# Samples of 40 to 87 tokens: longer than the sliding windows (8).
FEATURES = [
    {"input_ids": list(range(3, 90)), "labels": [-100] * 40 + list(range(43, 90))},
    {"input_ids": list(range(100, 141)), "labels": [-100] * 10 + list(range(110, 141))},
    {"input_ids": list(range(7, 70)), "labels": [-100] * 30 + list(range(37, 70))},
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, save_family(tmp_path_factory.mktemp(request.param), request.param)


def load_bf16(folder):
    """The model as chatlora loads it for training on a GPU (model/load.py picks the attention)."""
    from transformers import GenerationConfig

    from chatlora.model.load import load_model, load_tokenizer
    from chatlora.model.source import resolve

    cfg = ModelConfig(name=str(folder), dtype="bfloat16")
    source = resolve(cfg)
    return load_model(source, cfg, load_tokenizer(source, cfg), GenerationConfig.from_pretrained(folder), "cuda")


def adapted(model):
    model = add_lora(model, LoraSettings(r=4, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_and_grads(model, batch):
    model.zero_grad()
    total, count = trained_token_loss(model, cuda(batch))
    (total / count).backward()
    return total.item(), [p.grad.float().clone() for p in model.parameters() if p.requires_grad]


def close(a, b, rel: float = 2e-2) -> None:
    assert a[0] == pytest.approx(b[0], rel=rel)
    for x, y in zip(a[1], b[1]):
        assert (x - y).norm() <= 0.05 * y.norm() + 1e-6


def test_varlen_packed_rows_equal_padded_sdpa(family):
    name, folder = family
    model = adapted(load_bf16(folder))
    if name == "gemma2":  # soft-capped attention: transformers' eager, and no packing (plan/entry.py)
        assert model.config._attn_implementation == "eager"
        return
    assert model.config._attn_implementation == attention.NAME
    assert packing_is_exact(model)
    close(loss_and_grads(model, PackCollator()(FEATURES)), loss_and_grads(model, PadCollator(pad_id=257)(FEATURES)))


def test_a_packed_pass_replayed_from_a_cuda_graph_equals_it_eager(family):
    from chatlora.trainer.speed.graphs import PassGraphs

    name, folder = family
    if name == "gemma2":  # trains on padded batches, which graphs do not take (recipes/train.py)
        pytest.skip("gemma2 does not pack")
    model = adapted(load_bf16(folder))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = cuda(PackCollator(pad_to=64, pad_id=257)(FEATURES))

    def forward_backward(inputs, items):
        total, _ = trained_token_loss(model, inputs)
        loss = total / items
        loss.backward()
        return loss.detach()

    graphs = PassGraphs(params, warmup=1)
    results = []
    for _ in range(3):  # eager, recorded + replayed, replayed
        for p in params:
            p.grad = None
        loss = graphs.run(batch, torch.tensor(150), forward_backward)
        results.append((loss.item(), [p.grad.float().clone() for p in params]))
    assert graphs.failure is None and graphs.replays == 2
    close(results[1], results[0], rel=1e-3)
    close(results[2], results[0], rel=1e-3)


def test_cuda_graph_decode_equals_the_same_steps_without_graphs(family):
    from chatlora.generate.decode import StaticDecoder, parity
    from decoding import greedy_rows

    _, folder = family
    model = load_bf16(folder).eval()
    prompts = [[5, 6, 7, 8, 9], [100, 20, 30], list(range(40, 60))]

    def run(mode: str) -> list[list[int]]:
        decoder = StaticDecoder(model, slots=4, columns=160, mode=mode)
        if mode == "graphs":
            assert parity(decoder) < 0.1
            assert decoder.warm_up() > 0
        out, _ = greedy_rows(decoder, joins={i: i for i in range(3)}, limits={i: 40 + 10 * i for i in range(3)}, prompts=prompts)
        return [out[i] for i in range(3)]

    assert run("graphs") == run("static")


LIGER_SCRIPT = """
import json, sys, torch
sys.path[:0] = sys.argv[3:]
from test_gpu_families import FEATURES, adapted, load_bf16, loss_and_grads
from chatlora.data.collate import PackCollator
from chatlora.model.kernels import use_liger
line = use_liger(sys.argv[1], True, False)
model = adapted(load_bf16(sys.argv[2]))
print(json.dumps({"line": line, "loss": loss_and_grads(model, PackCollator()(FEATURES))[0]}))
"""


def test_liger_kernels_give_the_models_own_loss(family):
    """In a process of its own: Liger patches transformers' code for the rest of the process."""
    pytest.importorskip("liger_kernel")
    from transformers import AutoConfig

    name, folder = family
    model_type = AutoConfig.from_pretrained(folder).model_type
    own = loss_and_grads(adapted(load_bf16(folder)), PackCollator()(FEATURES))[0]
    out = subprocess.run([sys.executable, "-c", LIGER_SCRIPT, model_type, str(folder), *sys.path], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if name == "glm":
        assert result["line"] == "note: model.kernels=liger ignored: Liger has no kernels for model type 'glm'"
    else:
        assert result["line"].startswith("kernels: Liger's rms_norm"), result["line"]
        if name in ("glm4", "deepseek_v2", "deepseek_v3"):
            assert "rope" not in result["line"]  # Liger's RoPE does not fit them (model/kernels.py)
    assert result["loss"] == pytest.approx(own, rel=2e-2)
