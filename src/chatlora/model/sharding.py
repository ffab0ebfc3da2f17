"""Whether a model or some of its weights are sharded by FSDP2 (torch.distributed.fsdp.fully_shard).

Here, below the loss (model/loss.py) and the trainer (trainer/distributed/fsdp.py), because both ask
it: the loss cannot apply a sharded output layer outside the forward pass, and the trainer gathers a
sharded adapter before saving it.
"""

from __future__ import annotations


def sharded(model, weights=None) -> bool:
    """Whether the model is sharded by FSDP2: it is an FSDP module, or one of `weights` (default: all
    its parameters) is a DTensor shard."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FSDPModule) or any(isinstance(p, DTensor) for p in (model.parameters() if weights is None else weights))
