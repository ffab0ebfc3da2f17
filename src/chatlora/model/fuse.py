"""Projections of the same input as one matmul, for decoding.

At batch 1 a decode step reads every weight once per token, and each of a layer's projections is
its own matrix-vector product: q, k and v (and the MLP's gate and up) are three (two) kernels that
each read a 4096-wide input and run well below the memory bandwidth on their own. Concatenated,
they are one larger product at a better share of the bandwidth, with fewer launches.

The model's own modules stay in charge: the first projection of a group computes the whole group's
output and hands each sibling its share, in the order the model's forward calls them (q, k, v;
gate, up). The original weights become views into the concatenated one, so memory does not grow
and `undo()` puts the original modules back. Only plain `nn.Linear` layers are fused: a LoRA layer
left unmerged (several adapters served on one base) or a quantized one keeps its own forward.

Fusing relies on that call order, so the caller checks the fused model against the unfused one
(chatlora.generate.decode.fast_decoder compares their logits) and undoes it when they differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Names of the projections that share an input, in the order Llama-family forwards call them."""


class _Group:
    """The concatenated weight of a group and the output of its last call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        self.weight, self.bias, self.sizes = weight, bias, sizes
        self.parts: tuple[torch.Tensor, ...] = ()


class FusedProjection(nn.Module):
    """One projection of a group: the first computes the group, the others take their share."""

    def __init__(self, group: _Group, index: int, original: nn.Linear):
        super().__init__()
        self.group, self.index = group, index
        self.in_features, self.out_features = original.in_features, original.out_features
        self._original = (original,)  # in a tuple: not a submodule, so its weight is not listed twice

    @property
    def weight(self) -> torch.Tensor:  # for code that looks at a projection's weight (dtype, device)
        return self._original[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        if self.index == 0:
            group.parts = F.linear(x, group.weight, group.bias).split(group.sizes, dim=-1)
        return group.parts[self.index]


def _fusable(layers: list) -> bool:
    if not all(type(m) is nn.Linear for m in layers):  # exactly Linear: not LoRA, not quantized
        return False
    first = layers[0]
    same = all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and m.weight.device == first.weight.device for m in layers)
    return same and len({m.bias is None for m in layers}) == 1


@torch.no_grad()
def fuse_projections(model) -> tuple[int, Callable[[], None]]:
    """Fuse each group of GROUPS found in `model`; returns (groups fused, undo)."""
    swaps: list[tuple[nn.Module, str, nn.Linear]] = []
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if any(m is None for m in layers) or not _fusable(layers):
                continue
            weight = torch.cat([m.weight for m in layers])
            bias = torch.cat([m.bias for m in layers]) if layers[0].bias is not None else None
            group = _Group(weight, bias, [m.out_features for m in layers])
            fused += 1
            start = 0
            for index, (name, linear) in enumerate(zip(names, layers)):
                end = start + linear.out_features
                # The original weights become views of the fused one: no second copy in memory.
                linear.weight = nn.Parameter(weight[start:end], requires_grad=False)
                if bias is not None:
                    linear.bias = nn.Parameter(bias[start:end], requires_grad=False)
                setattr(module, name, FusedProjection(group, index, linear))
                swaps.append((module, name, linear))
                start = end

    def undo() -> None:
        for module, name, linear in swaps:
            setattr(module, name, linear)

    return fused, undo
