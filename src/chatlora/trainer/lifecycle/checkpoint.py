"""Checkpoints that are either complete or absent.

Trainer writes checkpoint-N/ file by file, so a run killed half way through a save (SIGKILL, power
loss, a full disk) would leave a folder that looks like a checkpoint and holds half of one. chatlora's
trainer writes each checkpoint into checkpoints/.saving/checkpoint-N/, adds a stamp (STAMP: the
fingerprints of the config and data it was made with) and only then renames it into place. So a
folder named checkpoint-N with a stamp is complete, and resume takes nothing else. Which ones are
complete is the run folder's to say (chatlora.run: RunDir.latest_checkpoint), since commands that
only read a run (chat, eval, merge) look for them too.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatlora.errors import StorageError
from chatlora.run import STAMP, TRAINER_STATE, latest_checkpoint, replace_dir

STAGING = ".saving"

# Errors that mean "the disk would not take it" rather than a bug: full disk, quota, file size
# limit, permissions, read-only file system, failing device.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}
# Writers that report a refused write without an OSError: torch.save raises a RuntimeError from its
# C++ zip writer (no errno, and a message about stream positions); safetensors a SafetensorError
# quoting the OS error.
_TORCH_WRITER = re.compile(r"inline_container|PytorchStreamWriter|file write failed")
_OS_TEXT = re.compile(r"No space left|Disk quota|File too large|Permission denied|Read-only file system|I/O error", re.I)


def read_stamp(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STAMP).read_text("utf-8"))


def remove_partial(folder: Path) -> None:
    """Drop what an interrupted save left behind (only chatlora's own staging folder)."""
    shutil.rmtree(folder / STAGING, ignore_errors=True)


def storage_reason(error: BaseException) -> str | None:
    """Why a write failed, when the disk refused it (full, quota, permissions); None for anything else."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            where = f" ({seen.filename})" if seen.filename else ""
            return f"{seen.strerror or seen}{where}"
        text = str(seen)
        if isinstance(seen, RuntimeError) and _TORCH_WRITER.search(text):
            return "torch could not write the file (is the disk full, or over a quota or file-size limit?)"
        if not isinstance(seen, OSError) and _OS_TEXT.search(text):
            return text.splitlines()[0]
        seen = seen.__cause__ or seen.__context__
    return None


def save_atomically(trainer, save: Callable[[], None]) -> None:
    """Run Trainer's own checkpoint save into the staging folder, stamp it, then rename it into place.

    `trainer` is a TrainerOverrides (trainer/overrides.py): while `staging_root` is set, its `_get_output_dir` points Trainer's
    save there. Raises StorageError when the disk refuses (the earlier checkpoints stay as they were).
    """
    args, state = trainer.args, trainer.state
    root = Path(args.output_dir)
    name = f"checkpoint-{state.global_step}"
    staged, final = root / STAGING / name, root / name
    trainer.staging_root = root / STAGING
    try:
        save()
        trainer.staging_root = None
        if not staged.is_dir() and final.is_dir():
            staged = final  # a Trainer that ignores _get_output_dir saved in place: stamping last still marks it complete
        if state.best_model_checkpoint and Path(state.best_model_checkpoint) == staged:
            # Trainer recorded the best checkpoint where it was written; it lives at the final name.
            state.best_model_checkpoint = str(final)
            if args.should_save:
                state.save_to_json(str(staged / TRAINER_STATE))
        if args.should_save:
            (staged / STAMP).write_text(json.dumps(trainer.stamp or {}, indent=1), "utf-8")
        trainer.accelerator.wait_for_everyone()  # every rank has written its RNG state into the folder
        if args.should_save and staged != final:
            replace_dir(staged, final)
            with contextlib.suppress(OSError):  # left empty; from now on its presence means a save was cut short
                staged.parent.rmdir()
    except BaseException as e:
        trainer.staging_root = None
        if args.should_save and staged != final:
            shutil.rmtree(staged, ignore_errors=True)
        reason = storage_reason(e)
        if reason is None:
            raise
        kept = latest_checkpoint(root)
        raise StorageError(
            f"could not save the checkpoint of step {state.global_step} in {root}: {reason}. "
            + (f"The last complete checkpoint, {kept.name}, is kept. " if kept else "No earlier checkpoint exists. ")
            + "Free some space (or fix the folder's permissions) and continue with resume=auto."
        ) from None
    if args.should_save:
        from transformers.trainer_utils import rotate_checkpoints

        # Trainer rotated inside the staging folder (a no-op); the real rotation happens once the new
        # checkpoint is complete, so the old ones go only after it exists.
        rotate_checkpoints(output_dir=str(root), save_total_limit=args.save_total_limit,
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)
