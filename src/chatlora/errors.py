"""Errors a user can fix. The CLI prints them without a traceback and exits non-zero.

Anything else that escapes is a bug in chatlora and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

# Exit codes, documented in the README and `chatlora --help`. 2 matches argparse's own code for bad
# usage; 74 and 75 are sysexits.h's EX_IOERR and EX_TEMPFAIL ("try again later"), which job schedulers
# already read that way; 130 is the shell's code for a process ended by Ctrl-C (128 + SIGINT).
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_STORAGE = 74
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130


class ChatloraError(Exception):
    """A problem with the user's input (config, data, model path); the message says how to fix it."""

    exit_code = EXIT_USER_ERROR
    shared = False
    """Set on an error that rank 0 reports for every process of a multi-process run (trainer/distributed/world.py)."""
    label = "error"
    """What the CLI prints before the message."""


class ConfigError(ChatloraError):
    """An invalid config file, preset name, key or value."""


class ModelError(ChatloraError):
    """A base model or tokenizer that cannot be found or loaded."""


@dataclass(frozen=True)
class Problem:
    """One bad row: where it is, which field, and why."""

    source: str
    """File path."""
    where: str
    """`line 7` (JSONL, or a JSON syntax error), `index 3` (a JSON list), or `` for the whole file."""
    field: str
    """Dotted field path inside the row (`messages[2].role`), or `` for the whole row."""
    reason: str

    def __str__(self) -> str:
        place = f"{self.source}:{self.where}" if self.where else self.source
        field = f" [{self.field}]" if self.field else ""
        return f"{place}{field}: {self.reason}"


class DataError(ChatloraError):
    """Every bad row of the data, reported at once."""

    MAX_SHOWN = 50

    def __init__(self, problems: list[Problem], hint: str = "", more: int = 0):
        self.problems = problems
        self.hint = hint
        self.more = more  # problems counted but not kept (streamed data keeps the first few only)
        super().__init__(self._message())

    def _message(self) -> str:
        n = len(self.problems) + self.more
        lines = [f"the data has {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  {p}" for p in self.problems[: self.MAX_SHOWN]]
        if n > min(self.MAX_SHOWN, len(self.problems)):
            lines.append(f"  ... and {n - min(self.MAX_SHOWN, len(self.problems))} more")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class PreflightError(ChatloraError):
    """The rendered, masked data would train the model wrongly (no trained token, wrong stop token...)."""


class ResumeError(ConfigError):
    """A checkpoint that cannot be resumed: missing, incomplete, or made with another config or data."""


class NonFiniteError(ChatloraError):
    """Training produced a NaN or inf loss or gradient; the last good checkpoint is kept."""

    exit_code = EXIT_NONFINITE
    shared = True  # every rank stops at the same step (the verdict is all-reduced): rank 0 says it


class StorageError(ChatloraError):
    """A file could not be written (disk full, quota, permission); what was saved before is kept."""

    exit_code = EXIT_STORAGE


class Preempted(ChatloraError):
    """Training stopped on SIGTERM or a first Ctrl-C after saving a resumable checkpoint. Not an error
    of the user's: the message says how to continue."""

    exit_code = EXIT_PREEMPTED
    label = "stopped"
    shared = True  # every rank stops at the same step (trainer/lifecycle/stop.py): rank 0 says it


def file_in_the_way(path: Path) -> str | None:
    """Why `path` cannot become a folder ("is a file", "lies under X, which is a file"), or None."""
    part = next((p for p in (path, *path.parents) if p.exists()), None)
    if part is None or part.is_dir():
        return None
    return "is a file" if part == path else f"lies under {part}, which is a file"


def refuse_file_in_the_way(path: Path, key: str, default: str) -> None:
    """Raise ConfigError when `path`, which must become a folder, is a file or lies under one."""
    what = file_in_the_way(path)
    if what:
        raise ConfigError(f"{key}={path} {what}; give a folder (or leave {key} {default})")


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of a multi-process job is gone
    (gloo: "Connection reset by peer", NCCL: a remote error), as opposed to a bug of this process."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    text = str(e)
    return type(e).__name__.startswith("Dist") or any(w in text for w in ("Connection reset by peer", "Connection closed by peer",
                                                                          "remote process exited", "NCCL communicator was aborted"))


def report(e: BaseException) -> int | None:
    """Print what the user needs to know of `e` on stderr and return the exit code; None for an
    exception that is a bug of chatlora (the caller lets it go on, with its traceback)."""
    if isinstance(e, ChatloraError):
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"{e.label}: {e}", file=sys.stderr)
        elif not (isinstance(e, ConfigError) or getattr(e, "shared", False)
                  or isinstance(e, ModelError) and os.environ.get("LOCAL_RANK", "0") != "0"):
            # Launched as several processes: rank 0 reports what every process meets (the config) and
            # what they shared at a common wait (the data); a model is loaded from each node's own
            # files, so the first process of each node reports that; the rest only what they alone met.
            print(f"{e.label} (rank {rank}): {e}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(e, RuntimeError) and lost_peer(e):
        # Another process of the job died (killed, out of memory): its own output says why; a
        # traceback from each survivor's wait adds nothing.
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error (rank {os.environ.get('RANK', '0')}): lost contact with another process of the job ({first[:300]}); "
              "it stopped first, see its own message. Continue from the last checkpoint with resume=auto", file=sys.stderr)
        return 1
    return None
