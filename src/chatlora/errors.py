"""Errors a user can fix. The CLI prints them without a traceback and exits non-zero.

Anything else that escapes is a bug in chatlora and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit codes, documented in the README. 2 matches argparse's own code for bad usage.
EXIT_USER_ERROR = 2


class ChatloraError(Exception):
    """A problem with the user's input (config, data, model path); the message says how to fix it."""

    exit_code = EXIT_USER_ERROR
    shared = False
    """Set on an error that rank 0 reports for every process of a multi-process run (trainer.world)."""


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

    def __init__(self, problems: list[Problem], hint: str = ""):
        self.problems = problems
        self.hint = hint
        super().__init__(self._message())

    def _message(self) -> str:
        n = len(self.problems)
        lines = [f"the data has {n} problem{'s' if n != 1 else ''}:"]
        lines += [f"  {p}" for p in self.problems[: self.MAX_SHOWN]]
        if n > self.MAX_SHOWN:
            lines.append(f"  ... and {n - self.MAX_SHOWN} more")
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class PreflightError(ChatloraError):
    """The rendered, masked data would train the model wrongly (no trained token, wrong stop token...)."""
