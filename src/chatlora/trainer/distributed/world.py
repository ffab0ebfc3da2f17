"""The processes of one training job (started by torchrun, `accelerate launch` or `chatlora train
--gpus N`): who is who, and the few points where they wait for each other.

One process (no WORLD_SIZE in the environment) is a `World` of size 1, and every helper here is then a
plain function call: nothing to set up, nothing to wait for.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from chatlora.errors import ChatloraError, ConfigError

T = TypeVar("T")

# The waits below sit on a gloo group of their own with a long timeout: while rank 0 tokenizes a large
# dataset the others wait at a CPU barrier, never at an NCCL collective (whose watchdog would kill
# the job after ddp_timeout). A rank that dies still ends the wait at once: its sockets close, and
# torchrun stops the others.
WAIT_TIMEOUT = timedelta(hours=24)


def rank_from_env() -> int:
    """This process's global rank as the launcher set it (0 when not launched as several)."""
    return int(os.environ.get("RANK", "0"))


def size_from_env() -> int:
    """The number of processes of the job as the launcher set it (1 when not launched as several)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class PeerFailed(ChatloraError):
    """Another process failed at a point where all wait for each other; it reports its own error (rank 0
    repeats it, so it shows once, whichever rank it came from)."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    """Global rank (0 .. size-1)."""
    local_rank: int = 0
    """Rank on this node (the GPU index)."""
    size: int = 1
    """Processes in the job."""
    local_size: int = 1
    """Processes on this node."""
    group: Any = None
    """The gloo process group of the waits (None for one process)."""

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, logs, plots and writes the run folder."""
        return self.rank == 0

    @property
    def local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.size // max(1, self.local_size))

    def _gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)

    def share(self, value: T) -> T:
        """Rank 0's `value`, on every rank (e.g. the run folder's name, which holds the time)."""
        if self.size == 1:
            return value
        return self._gather(value)[0]

    def in_turn(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank, rank 0 first, then the first process of each other node, then the
        rest, each turn after the one before has finished.

        For work whose result is cached on disk (tokenization): rank 0 does it, each other node's first
        process finds it in a cache shared between nodes or redoes it once into its node's own cache,
        and every other process loads it. The work is done once per cache, never once per process.

        A ChatloraError (bad data, say) in any turn stops every rank: the failing rank raises its own
        error, the others raise PeerFailed with its message and do not run `fn`. Raises whatever `fn`
        raises on the rank where it happened.
        """
        if self.size == 1:
            return fn()
        turn = 0 if self.main else 1 if self.local_main else 2
        result: T | None = None
        for current in range(3):
            failure: tuple[str, int] | None = None
            error: BaseException | None = None
            if current == turn:
                try:
                    result = fn()
                except Exception as e:  # noqa: BLE001  (shared with the others, then raised here)
                    error = e
                    failure = (str(e) if isinstance(e, ChatloraError) else f"{type(e).__name__}: {e}",
                               e.exit_code if isinstance(e, ChatloraError) else 1)
            failures = [(rank, f) for rank, f in enumerate(self._gather(failure)) if f is not None]
            if error is not None:
                if self.rank != 0 and isinstance(error, ChatloraError):
                    error.shared = True  # rank 0 repeats it (the CLI prints it there only)
                raise error
            if failures:
                rank, (message, code) = failures[0]
                stop = PeerFailed(message if rank == 0 else f"(rank {rank}) {message}")
                stop.exit_code, stop.shared = code, True
                raise stop
        return result  # type: ignore[return-value]

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0 only while the others wait; its ChatloraError stops every rank (as in
        `in_turn`). Returns fn's result on rank 0, None elsewhere."""
        return self.in_turn(fn if self.main else lambda: None)


def start(training: dict[str, Any]) -> World:
    """This process's place in the job. When launched as several processes, joins the job's process
    group through accelerate (NCCL on GPUs, gloo on CPUs; `training.ddp_backend` and
    `training.ddp_timeout` apply, as they would in Trainer) and opens the gloo group of the waits."""
    size = size_from_env()
    if size == 1:
        return World()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:  # WORLD_SIZE left in the environment by something else, not a launcher
        raise ConfigError(f"WORLD_SIZE={size} is set but {', '.join(missing)} not: this process was not started by a "
                          "launcher. Unset WORLD_SIZE for one process, or start the job with chatlora train --gpus N, "
                          "torchrun or accelerate launch")
    import torch
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        # TrainingArguments later builds its PartialState on this same process group. Without a GPU
        # accelerate joins the processes only when told it runs on the CPU (gloo).
        PartialState(cpu=not torch.cuda.is_available(), backend=training.get("ddp_backend"),
                     timeout=timedelta(seconds=int(training.get("ddp_timeout", 1800))))
        atexit.register(_close)
    group = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    if dist.get_rank() != 0:
        # Rank 0's bars speak for every process (loading weights, tokenizing, saving).
        import datasets
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
    return World(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=dist.get_world_size(),
                 local_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(size))), group=group)


def _close() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

