"""The config of one training source (`data.train` entries written as mappings) and of the identity set.

A `data.train` entry is a path (a string) or a `SourceConfig` mapping; `check_sources` checks the
mixing settings of all entries together, since a weight is a share of the whole mix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chatlora.errors import ConfigError

# The row keys a source's `columns` may rename: the formats' own keys (data/formats.py), top level and per turn.
COLUMN_KEYS = ("instruction", "input", "output", "system", "history", "messages", "conversations",
               "role", "content", "from", "value")
ROLE_KEYS = ("user", "assistant", "system")


@dataclass
class SourceConfig:
    path: str = ""
    """The data: a JSON, JSONL, CSV, Parquet or Arrow file; a folder or glob of them; a folder written by
    `datasets`' save_to_disk; `hf:org/name[:config][@split]` (a Hugging Face hub dataset, through the
    `datasets` library, split `train` unless named); or `modelscope:org/name[:subset][@split]`
    (through the `modelscope` package: `pip install 'chatlora[modelscope]'`)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Row keys under other names: `{instruction: question, output: answer}`, `{messages: dialog}`, or
    per turn `{role: speaker, content: text}`. Maps chatlora's key to the file's key."""
    roles: dict[str, str] = field(default_factory=dict)
    """Role names of a conversation file under other names: `{user: customer, assistant: agent}`."""
    weight: float | None = None
    """This source's share of the training samples of each epoch, drawn with data.seed (rows are
    repeated when the share is larger than the source). When every source has a weight the weights are
    relative and the epoch keeps the sources' total rows; otherwise they are shares of the whole mix
    (summing below 1) and the other sources contribute their rows as they are."""
    samples: int | None = None
    """A fixed number of samples from this source per epoch: fewer than its rows draws a subset, more
    repeats rows (whole copies, then a subset), drawn with data.seed. Not with `weight`."""
    system_prompt: str | None = None
    """System message for this source's rows that have none (overrides data.system_prompt)."""
    train_on: str | None = None
    """Which assistant turns of this source's rows are trained: all or last (overrides data.train_on)."""

    def __post_init__(self) -> None:
        if not self.path or not self.path.strip():
            raise ConfigError("data.train: a source mapping needs a path (path: data.json)")
        for key, value in self.columns.items():
            if key not in COLUMN_KEYS:
                raise ConfigError(f"data.train ({self.path}): columns.{key} is not a row key; "
                                  f"one of {', '.join(COLUMN_KEYS)}")
            if not isinstance(value, str) or not value:
                raise ConfigError(f"data.train ({self.path}): columns.{key} must name the file's key")
        for key, value in self.roles.items():
            if key not in ROLE_KEYS or not isinstance(value, str) or not value:
                raise ConfigError(f"data.train ({self.path}): roles.{key}: give {', '.join(ROLE_KEYS)} "
                                  "each the file's role name")
        if self.weight is not None and not self.weight > 0:
            raise ConfigError(f"data.train ({self.path}): weight {self.weight} must be more than 0")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"data.train ({self.path}): samples {self.samples} must be at least 1")
        if self.weight is not None and self.samples is not None:
            raise ConfigError(f"data.train ({self.path}): give weight or samples, not both")
        if self.train_on not in (None, "all", "last"):
            raise ConfigError(f"data.train ({self.path}): train_on {self.train_on!r} is not one of all, last")


@dataclass
class IdentityConfig:
    name: str | None = None
    """Adds "who are you / who made you" conversations answering with this name (off while None), from
    the templates shipped in the package, as one more source (`identity`)."""
    author: str = "its developers"
    """Who made the assistant, in those conversations."""
    language: str = "both"
    """The identity templates' language: en, zh or both."""

    def __post_init__(self) -> None:
        if self.language not in ("en", "zh", "both"):
            raise ConfigError(f"data.identity.language: {self.language!r} is not one of en, zh, both")
        if self.name is not None and not self.name.strip():
            raise ConfigError("data.identity.name: empty; give the assistant's name, or null for no identity set")


def as_source(entry: str | SourceConfig) -> SourceConfig:
    """A `data.train` entry as a SourceConfig (a bare path has no mixing settings)."""
    return entry if isinstance(entry, SourceConfig) else SourceConfig(path=entry)


def check_sources(train: list[str | SourceConfig], streaming: bool = False, needs_memory: bool = False) -> None:
    """Weights that cannot be met together, and mixing asked of streamed data (which is read once, in
    order: `needs_memory` is an identity set or a fractional validation split). Raises ConfigError."""
    sources = [as_source(e) for e in train]
    if streaming and (needs_memory or any(s.weight is not None or s.samples is not None for s in sources)):
        raise ConfigError("data.streaming reads the sources once, in order: it takes no weight or samples, "
                          "no data.identity and no fractional data.validation (give a validation file)")
    weighted = [s for s in sources if s.weight is not None]
    if weighted and len(weighted) < len(sources):
        total = sum(s.weight for s in weighted)
        if total >= 1:
            raise ConfigError(f"data.train: the weights sum to {total:g}, but with sources that have no weight "
                              "they are shares of the whole mix and must sum below 1 "
                              "(or give every source a weight, making them relative)")
