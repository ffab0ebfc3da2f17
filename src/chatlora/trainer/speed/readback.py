"""Device values the host reads a little later, without waiting for the work queued after them.

Why: `.item()` on a CUDA tensor waits until the GPU has run everything queued so far. Done once per
step, the GPU then idles while the CPU prepares and queues the next step (collating the batch,
launching the pass: a tenth of a short step with CUDA graphs; docs/benchmarks.md). A value
copied to pinned host memory as soon as it is computed can be read once that copy is done, while
the GPU goes on with what follows: the CPU stays a step ahead.
"""

from __future__ import annotations

import torch


class Readback:
    """`tensor`'s value on the host, as it is now in the device's order of work."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.copied: torch.cuda.Event | None = torch.cuda.Event()
            self.copied.record()
        else:
            self.host, self.copied = tensor.clone(), None

    def ready(self) -> bool:
        """Whether value() returns at once."""
        return self.copied is None or self.copied.query()

    def value(self) -> torch.Tensor:
        """The value (a CPU tensor); waits for the copy only, not for later work."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.host
