"""Gradient checks and clipping in a few fused kernels, on each process's own shards.

Why: a LoRA model has hundreds of small trainable tensors (448 on a 7B model). Done tensor by tensor
(an isfinite per gradient), a check costs hundreds of kernel launches per optimizer step. Under FSDP2
the gradients are DTensors and it is far worse: every per-tensor op goes through DTensor's Python
dispatch, and a norm of a sharded tensor is a partial value that costs an all-reduce of its own when
read. torch's clip_grad_norm_ on them costs a large share of a 7B model's step in CPU time alone
(the profile: docs/benchmarks.md). Here every process reduces the shards it holds with plain
tensors, and the processes add up one number.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def local(grad: torch.Tensor) -> torch.Tensor:
    """The part of `grad` this process holds: a DTensor's local shard, a plain tensor itself."""
    to_local = getattr(grad, "to_local", None)  # DTensor; plain tensors have no to_local
    return to_local() if to_local is not None else grad


def local_grads(params: Iterable[torch.nn.Parameter]) -> list[torch.Tensor]:
    return [local(p.grad) for p in params if p.grad is not None]


def norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor, in float32 (bf16 gradients too), as one tensor: one fused kernel."""
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))


def all_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """A boolean tensor: every element of `grads` is finite (a NaN or inf makes its tensor's norm
    NaN or inf). Two kernels for any number of tensors; no host sync."""
    return norms(grads).isfinite().all()


def sharded_grads(params: list[torch.nn.Parameter]):
    """The process group the gradients of `params` are sharded over (FSDP2: all are DTensors with
    one placement, Shard(0), on one 1-D mesh, held on the mesh's device), or None when they are not
    all sharded that way (torch's own clipping then applies: gradients offloaded to the CPU, say)."""
    grads = [p.grad for p in params if p.grad is not None]
    meshes = {getattr(g, "device_mesh", None) for g in grads}
    if not grads or len(meshes) != 1 or None in meshes:
        return None
    (mesh,) = meshes
    if mesh.ndim != 1 or any(len(g.placements) != 1 or not g.placements[0].is_shard() for g in grads):
        return None
    if any(g.to_local().device.type != mesh.device_type for g in grads):
        return None
    return mesh.get_group()


def sharded_norm(params: list[torch.nn.Parameter], group) -> torch.Tensor:
    """The 2-norm of all gradients of `params` as one vector, for gradients sharded over `group`
    (each element held by one process). A float32 tensor, the same on every process."""
    return _total_norm(local_grads(params), group)


def clip_sharded(params: list[torch.nn.Parameter], max_norm: float, group) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_(params, max_norm) for gradients sharded over `group`: every
    shard scaled by the same factor. Returns the total norm before clipping (sharded_norm)."""
    grads = local_grads(params)
    total = _total_norm(grads, group)
    # As torch.nn.utils.clip_grads_with_norm_: scale only down, never up.
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale)
    return total


def _total_norm(shards: list[torch.Tensor], group) -> torch.Tensor:
    """The squared norms of this process's shards, summed over `group` by one all-reduce."""
    import torch.distributed as dist

    squares = norms(shards).square().sum()
    dist.all_reduce(squares, group=group)
    return squares.sqrt()
