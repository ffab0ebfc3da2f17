"""What `resume=` continues from, and whether the checkpoint was made with the same config and data.

Exactness itself is transformers' Trainer's: `train(resume_from_checkpoint=...)` restores the adapter,
optimizer, scheduler, step, RNG states and skips the batches already seen. What chatlora adds: only
complete checkpoints are taken (trainer/lifecycle/checkpoint.py), and each carries a fingerprint of everything
that changes the steps taken, so resuming with another config or other data is refused by name
instead of silently giving a run that matches neither.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatlora.config.load import to_dict
from chatlora.config.schema import Config
from chatlora.errors import ResumeError
from chatlora.run import STAMP, RunDir, complete_checkpoints, latest_checkpoint, step_of
from chatlora.trainer.lifecycle.checkpoint import read_stamp

# Config keys that do not change the steps taken: where things are written, what is printed, logged
# or evaluated, when checkpoints are saved, and machine-speed settings. The data files are compared
# by their tokenized content (the data hash), not by path, so a moved file resumes fine.
IGNORED = {
    "output_dir", "name", "resume", "resume_allow_changes", "on_nonfinite", "report", "eval",
    "data.train", "data.validation", "data.cache_dir", "model.compile", "model.cuda_graphs", "model.kernels",
}
# How a step's samples are split: processes x micro-batch x accumulation (only their product counts).
PROCESS_SPLIT = {"per_device_train_batch_size", "gradient_accumulation_steps", "use_cpu", "ddp_find_unused_parameters"}
IGNORED_TRAINING = {
    "output_dir", "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
    "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name", "project",
    "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "eval_strategy", "eval_steps", "eval_delay",
    "per_device_eval_batch_size", "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object",
    "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics", "prediction_loss_only", "save_only_model",
    "save_strategy", "save_steps", "save_on_each_node", "save_total_limit", "enable_jit_checkpoint", "push_to_hub",
    "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    "skip_memory_metrics", "do_train", "do_eval", "do_predict", "resume_from_checkpoint", "local_rank",
    "dataloader_pin_memory", "dataloader_num_workers", "dataloader_persistent_workers", "dataloader_prefetch_factor",
    "ddp_timeout", "torch_empty_cache_steps", "restore_callback_states_from_checkpoint",
}
DATA = "the tokenized training data (its rows, the chat template, the tokenizer or data.max_length/overlong/train_on/reasoning)"


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def _steps_part(key: str, value: Any) -> Any:
    """The part of a setting that changes the steps taken: accelerate's settings less how batches are
    copied to the GPU (non_blocking, which a GPU run sets: trainer/arguments.py)."""
    if key == "training.accelerator_config" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "non_blocking"}
    return value


def fingerprint(cfg: Config, args, data_key: str) -> dict[str, Any]:
    """What a checkpoint stores: the settings that change the steps taken (flat dotted keys, the
    effective TrainingArguments rather than the config's `training:` section, so a default spelt out
    is no change), their hash, and the training split's content hash."""
    flat: dict[str, Any] = {}
    raw = to_dict(cfg)
    raw.pop("training")
    _flatten(raw, "", flat)
    for key, value in args.to_dict().items():
        if key not in IGNORED_TRAINING and key not in PROCESS_SPLIT:
            flat[f"training.{key}"] = _steps_part(f"training.{key}", value)
    # The global batch, not how it is split over processes and micro-batches: a DDP run resumed on
    # another number of processes trains the same steps (trainer/distributed/split.py's check_resume
    # decides which world-size changes are allowed, and says so).
    flat["samples_per_step"] = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    flat = {k: v for k, v in flat.items() if k not in IGNORED and k.split(".")[0] not in IGNORED}
    flat = json.loads(json.dumps(flat, sort_keys=True, default=str))  # as it reads back from the stamp
    digest = hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:24]
    return {"config": flat, "config_hash": digest, "data_hash": data_key}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two fingerprints, one line each."""
    lines = []
    if old.get("config_hash") != new.get("config_hash"):
        a, b = old.get("config", {}), new.get("config", {})
        # Keys only one side has come from another transformers version's TrainingArguments, not from the user.
        # (A stamp written before a setting's part was left out still holds it: compared without it.)
        lines += [f"{key}: {a[key]!r} -> {b[key]!r}" for key in sorted(a.keys() & b.keys())
                  if _steps_part(key, a[key]) != _steps_part(key, b[key])]
    if old.get("data_hash") != new.get("data_hash"):
        lines.append(DATA)
    return lines


@dataclass
class Plan:
    """What `chatlora train` does with the run folder."""

    kind: str
    """new (a new run folder), restart (an unfinished run with no checkpoint, started over in its
    folder), resume (from `checkpoint`), finished (resume=auto on a run that has its adapter)."""
    run: RunDir
    checkpoint: Path | None = None


def plan(cfg: Config, run: RunDir) -> Plan:
    """Decide from `cfg.resume` and what the run folder holds; reads only. Raises ResumeError for a
    checkpoint that is not there, not complete or damaged, a finished run resumed by path with the
    settings it was made with, or a folder that is not a chatlora run."""
    if cfg.resume is None:
        return Plan("new", run)
    if cfg.resume != "auto":
        chosen = _explicit(cfg, Path(cfg.resume).expanduser())
        check_readable(chosen.checkpoint)
        return chosen
    if not run.path.exists() or not any(run.path.iterdir()):
        return Plan("new", run)
    if not run.config.is_file():
        raise ResumeError(f"resume=auto: {run.path} is not a chatlora run folder (no config.yaml); choose another output_dir")
    if (run.adapter / "adapter_model.safetensors").is_file():
        return Plan("finished", run)
    checkpoint = latest_checkpoint(run.checkpoints)
    if checkpoint is None:
        return Plan("restart", run)
    check_readable(checkpoint)
    return Plan("resume", run, checkpoint)


def check_readable(checkpoint: Path) -> None:
    """Raise ResumeError naming the first file of a complete checkpoint that cannot be read: cut short,
    emptied or overwritten after it was saved (a copy or a disk gone wrong). Trainer would otherwise
    fail half way into loading it, with torch's or json's error naming neither the file nor what to do."""
    from chatlora.model.load import unreadable  # imports torch

    for file in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        why = unreadable(file)
        if why is None:
            continue
        step = step_of(checkpoint) or 0
        earlier = [c for c in complete_checkpoints(checkpoint.parent) if (step_of(c) or 0) < step]
        fix = (f"resume from the checkpoint before it with resume={earlier[-1]} (the steps after it are trained again)"
               if earlier else f"no earlier checkpoint is complete: start the run over in another output_dir, or remove "
                               f"{checkpoint.parent} and train again with resume=auto")
        raise ResumeError(f"cannot resume from {checkpoint}: its file {file.name} is damaged ({why}); {fix}")


def _explicit(cfg: Config, path: Path) -> Plan:
    if (path / "config.yaml").is_file():  # a run folder: its newest complete checkpoint
        run = RunDir(path)
        checkpoint = latest_checkpoint(run.checkpoints)
        if checkpoint is None:
            raise ResumeError(f"resume={path}: the run has no complete checkpoint in {run.checkpoints} "
                              "(training.save_strategy=steps with training.save_steps=N saves some)")
    elif step_of(path) is not None and path.is_dir():
        if path not in complete_checkpoints(path.parent):
            raise ResumeError(f"resume={path}: not a complete chatlora checkpoint (no {STAMP}: an interrupted save, "
                              "or not written by chatlora); take a complete one from the same folder")
        checkpoint, run = path, RunDir(path.parent.parent)
        if not run.config.is_file():
            raise ResumeError(f"resume={path}: the checkpoint is not inside a chatlora run folder (RUN/checkpoints/checkpoint-N)")
    else:
        raise ResumeError(f"resume={path}: no such run folder or checkpoint folder (RUN or RUN/checkpoints/checkpoint-N)")
    if cfg.output_dir and Path(cfg.output_dir).resolve() != run.path.resolve():
        raise ResumeError(f"resume={path} continues the run in {run.path}, but output_dir={cfg.output_dir}; "
                          "leave output_dir out, or give that folder")
    if (run.adapter / "adapter_model.safetensors").is_file() and not cfg.resume_allow_changes:
        # As resume=auto leaves a finished run alone: with the settings its checkpoints were made with
        # (check_unchanged refuses others), resuming one could only train the same adapter again.
        raise ResumeError(f"resume={path}: the run in {run.path} has finished (its adapter is in {run.adapter}); "
                          "nothing to train. To train it further, add resume_allow_changes=true and a higher "
                          "training.max_steps (its adapter is then replaced).")
    return Plan("resume", run, checkpoint)


def check_unchanged(checkpoint: Path, current: dict[str, Any], allow: bool) -> list[str]:
    """The differences between the checkpoint's fingerprint and the current one; raises ResumeError
    naming them unless `allow`."""
    changes = differences(read_stamp(checkpoint), current)
    if changes and not allow:
        raise ResumeError(
            f"cannot resume from {checkpoint}: it was made with another config or other data:\n"
            + "".join(f"  {line}\n" for line in changes)
            + "Resume with the settings it was made with, or add resume_allow_changes=true to go on anyway "
              "(the result then differs from an uninterrupted run's)."
        )
    return changes
