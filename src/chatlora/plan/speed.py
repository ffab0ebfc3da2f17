"""Expected training speed: matmul FLOPs against the card's peak, plus a per-pass cost of issuing kernels.

FLOPs per token with a frozen base (N = the decoder layers' linear weights):
    forward 2N, backward 2N (gradients of the activations only: the base weights get no gradient,
    which saves the third 2N of full fine-tuning's 6N), + 2N with gradient checkpointing (the forward
    again). LoRA's own matmuls are r/hidden of that: left out.
    The output layer (V x h) runs on trained tokens only: forward, recomputed forward, input gradient:
    6Vh per trained token.
    Attention (flash): 2 s^2 D forward per sample of length s and layer (causal: half of QK^T and PV),
    about 2.5x that in backward; D = heads x head_dim.
A step also costs time that does not shrink with fewer tokens: at the seed recipe's ~1,100 tokens a
pass, the GPU waits on the CPU to launch ~15,000 small kernels (docs/benchmarks.md). That cost is per
decoder layer and forward pass, and larger with checkpointing (the recompute and its hooks).

Calibrated on measured step times of three settings (the runs, their card, versions and date:
docs/benchmarks.md, "the eager settings and TRL"): seed semantics (1 pass of ~1,088 tokens, no
checkpointing), throughput mode (~1.9 passes of <= 8,192 tokens) and seed semantics with
checkpointing. Solving the first two for the two unknowns gives MATMUL_EFFICIENCY and
PASS_SECONDS_PER_LAYER; the third gives the checkpointed per-pass cost. The per-pass cost depends on
the host CPU and the library versions, the efficiency on the card: on other cards read the estimate
as a rough guide.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatlora.plan.arch import Arch
from chatlora.plan.batches import PassStats
from chatlora.plan.memory import NF4_BYTES, Setup

MATMUL_EFFICIENCY = 0.46
PASS_SECONDS_PER_LAYER = 0.0051
PASS_SECONDS_PER_LAYER_CHECKPOINTED = 0.0135
# 4-bit base: each quantized weight is de-quantized to bf16 before its matmul, in the forward, the
# backward and the recompute: read 4 bits, write and read back 16 (not calibrated yet; bench/plan_check.py).
DEQUANT_BYTES = NF4_BYTES + 4
DEQUANT_SECONDS_PER_LAYER = 0.00025  # the de-quantization kernels' launches
BANDWIDTH_EFFICIENCY = 0.7


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float
    """Dense bf16 tensor-core peak with float32 accumulation (the vendor's datasheet; no sparsity)."""
    bandwidth_tbs: float


# Matched against torch.cuda.get_device_name() by the first key found in it (lower case).
GPUS = {
    "h200": Gpu("H200", 141, 989, 4.8),
    "h100 pcie": Gpu("H100 PCIe", 80, 756, 2.0),
    "h100 nvl": Gpu("H100 NVL", 94, 835, 3.9),
    "h100": Gpu("H100 SXM", 80, 989, 3.35),
    "gh200": Gpu("GH200", 96, 989, 4.0),
    "b200": Gpu("B200", 180, 2250, 8.0),
    "a100-sxm4-40gb": Gpu("A100 40GB", 40, 312, 1.55),
    "a100": Gpu("A100 80GB", 80, 312, 2.0),
    "l40s": Gpu("L40S", 48, 362, 0.86),
    "a6000": Gpu("RTX A6000", 48, 155, 0.77),
    "a10": Gpu("A10", 24, 125, 0.6),
    "l4": Gpu("L4", 24, 121, 0.3),
    "4090": Gpu("RTX 4090", 24, 165, 1.0),
}


def find_gpu(name: str) -> Gpu | None:
    """The table's entry for a device name (`NVIDIA H100 80GB HBM3`) or a short name (`h100`)."""
    lowered = name.lower()
    for key, gpu in GPUS.items():
        if key in lowered or lowered == gpu.name.lower():
            return gpu
    return None


@dataclass(frozen=True)
class Speed:
    seconds_per_step: float
    real_tokens_per_s: float
    mfu: float
    """Model FLOPs (no recompute) per second over the card's peak."""


def step_flops(arch: Arch, stats: PassStats, setup: Setup) -> tuple[float, float]:
    """(FLOPs a step computes, FLOPs of the model proper: without the recompute)."""
    n = arch.layer_linear
    attention = 2 * stats.attention_per_step * arch.heads * arch.head_dim * arch.layers
    model = 4 * n * stats.positions_per_step + 6 * arch.head * stats.trained_tokens_per_step + 3.5 * attention
    recompute = (2 * n * stats.positions_per_step + attention) if setup.checkpointing else 0
    return model + recompute, model


def estimate_speed(arch: Arch, stats: PassStats, setup: Setup, gpu: Gpu) -> Speed:
    total, model = step_flops(arch, stats, setup)
    per_layer = PASS_SECONDS_PER_LAYER_CHECKPOINTED if setup.checkpointing else PASS_SECONDS_PER_LAYER
    seconds = stats.passes_per_step * arch.layers * per_layer + total / (gpu.bf16_tflops * 1e12 * MATMUL_EFFICIENCY)
    if setup.quant == "nf4":
        rounds = 3 if setup.checkpointing else 2
        seconds += stats.passes_per_step * rounds * (
            arch.layer_linear * DEQUANT_BYTES / (gpu.bandwidth_tbs * 1e12 * BANDWIDTH_EFFICIENCY) + arch.layers * DEQUANT_SECONDS_PER_LAYER)
    return Speed(seconds, stats.real_tokens_per_step / seconds, model / seconds / (gpu.bf16_tflops * 1e12))
