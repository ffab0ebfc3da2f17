"""Agreeing across the processes of a distributed job: whether there are several, and whether a
flag is set on any of them (so all take the same branch, and none waits for ever in a collective)."""

from __future__ import annotations

import torch


def several_processes() -> bool:
    """Whether this process is one of several in a distributed job (collectives then need them all)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_rank(flag: bool, device) -> bool:
    """True when `flag` is true on any rank of a distributed job, so all ranks take the same branch."""
    import torch.distributed as dist

    if not several_processes():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # one tiny collective per optimizer step
    return bool(t.item())
