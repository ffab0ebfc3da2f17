"""Training on several processes: the global batch split over them, DDP or FSDP2 settings for
TrainingArguments, and the record of how a run was split (for resuming it).

The global batch (distributed.samples_per_step) stays what the config says whatever the number of
processes N. Every process draws the same shuffled order as one process would, and step k takes its
k-th slice of samples_per_step samples; the slice is split over the processes by tokens
(trainer/distributed/balance.py): samples_per_step / N samples each, or, where a process's share is packed into
passes by a token budget (data.batch_tokens), as many as even out the tokens. So the loss curve and
the trained adapter do not depend on N (tests/e2e/test_distributed.py checks it on 2 processes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from chatlora.config.schema import Config
from chatlora.errors import ConfigError

# TrainingArguments' own default micro-batch, used when the config names none.
DEFAULT_MICRO_BATCH = 8
RECORD = "distributed.json"


def samples_per_step(cfg: Config) -> int:
    """The global batch: distributed.samples_per_step, or the training section's micro-batch x
    accumulation (the step as written for one process)."""
    if cfg.distributed.samples_per_step:
        return cfg.distributed.samples_per_step
    training = cfg.training
    return int(training.get("per_device_train_batch_size", DEFAULT_MICRO_BATCH)) * int(training.get("gradient_accumulation_steps", 1))


def split_step(samples: int, processes: int, micro_batch: int) -> tuple[int, int]:
    """(micro-batch, accumulation steps) of one process, so that processes x micro-batch x
    accumulation = samples. The micro-batch is the largest that divides the process's share and is
    not above `micro_batch` (the memory the config planned for one forward pass).

    Raises ConfigError when the samples do not split evenly over the processes.
    """
    if samples % processes:
        lower, upper = samples // processes * processes, (samples // processes + 1) * processes
        raise ConfigError(
            f"distributed.samples_per_step={samples} does not split evenly over {processes} processes; "
            f"use a multiple of {processes} ({', '.join(str(n) for n in (lower, upper) if n > 0)}), so every process takes "
            "the same number of samples per step")
    share = samples // processes
    micro = max(d for d in range(1, min(micro_batch, share) + 1) if share % d == 0)
    return micro, share // micro


def distributed_arguments(cfg: Config, kwargs: dict[str, Any], processes: int) -> dict[str, Any]:
    """TrainingArguments kwargs for this process: its micro-batch and accumulation steps (from the
    global batch), and on several processes the DDP or FSDP2 settings, unless the config's
    `training:` section sets them itself."""
    out = dict(kwargs)
    micro = int(out.get("per_device_train_batch_size", DEFAULT_MICRO_BATCH))
    out["per_device_train_batch_size"], out["gradient_accumulation_steps"] = split_step(samples_per_step(cfg), processes, micro)
    if processes == 1:
        return out
    import torch

    if not torch.cuda.is_available():
        if cfg.distributed.strategy == "fsdp2":
            # accelerate (and so Trainer) shards models on accelerators only; torch's FSDP2 itself runs on
            # CPUs, and tests/e2e/test_fsdp2.py checks chatlora's FSDP2 parts there.
            raise ConfigError("distributed.strategy=fsdp2 needs GPUs (accelerate shards on accelerators only); "
                              "on CPU processes use distributed.strategy=ddp")
        # accelerate joins CPU processes (gloo) only with use_cpu; without it each trains alone.
        out.setdefault("use_cpu", True)
    if cfg.distributed.strategy == "fsdp2":
        out.setdefault("fsdp", True)
        # version 2 is FSDP2 (fully_shard); the config's own fsdp_config keys win.
        out["fsdp_config"] = {"version": 2, **(out.get("fsdp_config") or {})}
    else:
        # Every LoRA weight is used in every forward pass, so DDP need not search the graph for
        # unused parameters after each backward (Trainer turns the search on for peft models).
        out.setdefault("ddp_find_unused_parameters", False)
    return out


def describe(args, processes: int, uneven: bool = False) -> str:
    """How a step's samples are split, for the `batches:` line. `uneven`: the processes' shares may
    hold different numbers of samples (trainer/distributed/balance.py)."""
    per = args.per_device_train_batch_size * args.gradient_accumulation_steps
    if processes == 1:
        return f"{per} samples per optimizer step"
    if uneven:
        return f"{per * processes} samples per optimizer step (split over {processes} processes by tokens)"
    return f"{per * processes} samples per optimizer step ({per} on each of {processes} processes, balanced by tokens)"


def record(cfg: Config, args, processes: int, nodes: int) -> dict[str, Any]:
    """What `distributed.json` in the run folder holds: how the run was split."""
    return {"processes": processes, "nodes": nodes, "strategy": "fsdp2" if getattr(args, "fsdp", None) else "ddp" if processes > 1 else "single",
            "samples_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps * processes,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps}


def write_record(run_path: Path, data: dict[str, Any]) -> None:
    from chatlora.run import write_atomic

    write_atomic(run_path / RECORD, json.dumps(data, indent=2) + "\n")


def check_resume(run_path: Path, now: dict[str, Any]) -> str | None:
    """Whether a run folder may be resumed as `now` (a `record`) splits the work.

    Returns None when nothing changed, or a note when the number of processes changed in a way that
    trains the same model (DDP: the same samples per step, split differently; each process's
    checkpoint holds the whole optimizer state). Raises ConfigError for a change that cannot be
    resumed: another global batch (another training), or FSDP2 with another number of processes
    (its checkpoints are sharded per process). A folder without a record (one process, before
    chatlora recorded it) counts as one process.
    """
    path = run_path / RECORD
    before = json.loads(path.read_text()) if path.is_file() else {"processes": 1, "strategy": "single", "samples_per_step": None}
    if before.get("samples_per_step") not in (None, now["samples_per_step"]):
        raise ConfigError(
            f"this run was trained with {before['samples_per_step']} samples per optimizer step, now {now['samples_per_step']}; "
            f"resuming would change the training. Set distributed.samples_per_step={before['samples_per_step']}")
    if before["processes"] == now["processes"]:
        return None
    if "fsdp2" in (before["strategy"], now["strategy"]):
        raise ConfigError(
            f"this run was trained on {before['processes']} processes ({before['strategy']}), now {now['processes']} ({now['strategy']}); "
            f"FSDP2 checkpoints are sharded per process: resume it on {before['processes']} processes")
    return (f"resuming on {now['processes']} processes (the run began on {before['processes']}): "
            f"the same {now['samples_per_step']} samples per step, split differently")
