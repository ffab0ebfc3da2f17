"""Peak GPU memory of a LoRA training step, from first principles, in bytes.

What it predicts is `torch.cuda.max_memory_allocated()`: the tensors alive at the worst moment of a
step. The card needs more than that (the CUDA context and the caching allocator's unused blocks),
which `card_need` adds.

The worst moment is the start of the backward pass of the largest forward pass: every activation
kept for backward is alive, and the output layer's chunk or a decoder layer's backward adds its
short-lived buffers on top. What a llama-style decoder layer keeps per token, with frozen base
weights (a frozen linear keeps nothing for its own weight; its input is kept once, for the LoRA
A matrix, shared by the layers that read it), `a` bytes per activation element (2 under bf16):

    2 RMSNorms       a float32 copy of their input, for the variance's backward    2 x 4h
    attention        normed input, q, k, v (varlen repeats kv heads), output       a x (h + 4 x heads x head_dim)
    gated MLP        normed input, gate, silu(gate), up, silu(gate) x up           a x (h + 4 x intermediate)
    LoRA dropout     dropout output (what A sees) and its 1-byte mask, per         (a + 1) x (sum of the inputs
                     wrapped layer (p > 0 only; p = 0 is an identity)               of the wrapped layers)

For Qwen1.5-7B (h 4096, intermediate 11008) that is 166 KiB per token and layer, 270 KiB with
dropout. With gradient checkpointing a layer keeps only its input (a x h) and one layer at a time
is recomputed during backward.

The output layer runs on trained positions only, in chunks of at most CHUNK_ELEMENTS logits
(model/loss.py) recomputed in backward; a chunk's backward holds its float32 log-softmax, its
gradient and the gradient of the input (3 x 4 bytes per logit).
"""

from __future__ import annotations

from dataclasses import dataclass

from chatlora.plan.arch import Arch
from chatlora.model.loss import chunk_rows

GiB = 2**30
# NF4 with double quantization (QLoRA's recipe): 4 bits per weight, an 8-bit absmax per block of 64,
# and a float32 constant per 256 of those blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# A layer's backward allocates the gradients of its widest tensors while the kept ones are still
# alive: about the MLP's gate, up and product gradients and two hidden-width ones.
LAYER_BACKWARD = lambda arch, a: a * (3 * arch.intermediate + 2 * arch.hidden)  # noqa: E731
# The card needs more than the allocated peak: the CUDA context (~0.5 GiB, not counted by the
# allocator) and blocks the caching allocator holds but cannot reuse (a few to 15% of the allocated
# peak with packed batches of varying length, as measured: docs/benchmarks.md, "Memory plan").
CONTEXT_BYTES = 0.75 * GiB
FRAGMENTATION = 0.15


@dataclass(frozen=True)
class Setup:
    """What decides memory, besides the architecture and the forward pass's size."""

    weight_bytes: int = 2
    """Bytes per unquantized weight: 2 (bf16/fp16) or 4 (fp32)."""
    quant: str = "none"
    """none, or nf4 (the decoder layers' linear weights in 4 bits)."""
    autocast: bool = True
    """bf16/fp16 mixed precision: activations in 2 bytes, and autocast keeps 16-bit copies of the
    float32 LoRA weights for the step."""
    dropout: bool = True
    """LoRA dropout > 0."""
    checkpointing: bool = False
    dora: bool = False
    """lora.use_dora: each adapted layer keeps two of its outputs for the magnitudes' backward."""
    optimizer_states: int = 2
    """float32 states per trainable parameter: 2 for Adam/AdamW."""

    @property
    def act_bytes(self) -> int:
        return 2 if self.autocast or self.weight_bytes == 2 else 4


@dataclass(frozen=True)
class Memory:
    """The predicted peak, by part, in bytes."""

    weights: float
    adapter: float
    """LoRA weights (float32), their gradients and optimizer states, and autocast's 16-bit copies."""
    kept: float
    """Activations kept for backward at the peak (all layers, or their checkpoints)."""
    transient: float
    """The largest short-lived buffer on top of them."""
    transient_is: str
    """What that buffer is: "output layer chunk" or "layer backward"."""

    @property
    def peak(self) -> float:
        return self.weights + self.adapter + self.kept + self.transient

    @property
    def card_need(self) -> float:
        """Memory the card must have for this peak (context and allocator slack added)."""
        return self.peak * (1 + FRAGMENTATION) + CONTEXT_BYTES


def weight_bytes(arch: Arch, setup: Setup) -> float:
    if setup.quant == "nf4":
        return arch.layer_linear * NF4_BYTES + (arch.params - arch.layer_linear) * setup.weight_bytes
    return arch.params * setup.weight_bytes


def adapter_bytes(arch: Arch, setup: Setup) -> float:
    """LoRA (and DoRA magnitude) weights in float32 with their gradients, optimizer states and
    autocast copies, and the full copies of lora.modules_to_save in the weights' dtype (the copy, its
    gradient and its optimizer states)."""
    per_param = 4 + 4 + 4 * setup.optimizer_states + (2 if setup.autocast else 0)
    return arch.lora * per_param + arch.saved * setup.weight_bytes * (2 + setup.optimizer_states)


def lora_bytes_per_token(arch: Arch, setup: Setup) -> float:
    """What the adapters of one adapted layer add to what it keeps, per token: dropout's output and
    mask (p > 0), and under DoRA the base layer's output and the LoRA output of each wrapped layer,
    which the magnitudes' gradient needs (peft's DoraLinearLayer)."""
    a = setup.act_bytes
    dropout = (a + 1) * arch.lora_inputs if setup.dropout else 0
    return dropout + (2 * a * arch.lora_outputs if setup.dora else 0)


def layer_bytes_per_token(arch: Arch, setup: Setup) -> float:
    """Activations one adapted decoder layer keeps for backward, per token (no checkpointing)."""
    a, h = setup.act_bytes, arch.hidden
    attention = a * (h + 4 * arch.heads * arch.head_dim)
    mlp = a * (h + 4 * arch.intermediate)
    return 2 * 4 * h + attention + mlp + lora_bytes_per_token(arch, setup)


def logits_chunk_rows(arch: Arch) -> int:
    return chunk_rows(arch.vocab)  # the loss's own rule (model/loss.py)


def estimate(arch: Arch, setup: Setup, tokens: int, trained: int) -> Memory:
    """Peak memory of a step whose largest forward pass has `tokens` positions, `trained` of them trained."""
    a, h = setup.act_bytes, arch.hidden
    # Outside the layers: the embedding output, the final norm's float32 copy, and the hidden states
    # of trained positions (float32, as autocast hands them back, and the gathered copy).
    outside = (a + 4) * h * tokens + 8 * h * trained
    layer = layer_bytes_per_token(arch, setup) * tokens
    # Layers outside lora.layers_to_transform keep no adapter activations.
    unadapted = (arch.layers - (arch.lora_layers or arch.layers)) * lora_bytes_per_token(arch, setup) * tokens
    layer_backward = LAYER_BACKWARD(arch, a) * tokens
    if setup.quant == "nf4":
        layer_backward += 2 * arch.hidden * arch.intermediate  # one weight de-quantized for its matmul
    if setup.checkpointing:
        kept = arch.layers * a * h * tokens + outside
        layer_backward += layer  # the recomputed layer
    else:
        kept = arch.layers * layer - unadapted + outside
    logits = 12 * arch.vocab * min(logits_chunk_rows(arch), trained)
    # DoRA's weight norm builds the updated weight of a wrapped layer in full (its float32 LoRA
    # product, then the sum in the weights' dtype), once per layer and pass.
    dora = arch.largest_target * (4 + setup.weight_bytes) if setup.dora else 0
    transient, what = max((logits, "output layer chunk"), (layer_backward, "layer backward"), (dora, "DoRA weight norm"),
                          key=lambda c: c[0])
    return Memory(weight_bytes(arch, setup), adapter_bytes(arch, setup), kept, transient, what)
