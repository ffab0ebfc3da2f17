"""The identity set (`data.identity`): "who are you / who made you" conversations in English and Chinese,
from the templates in the package (examples/identity/{en,zh}.jsonl), with the assistant's name and
author filled in. They are read like any data file, as one more source named `identity`.
"""

from __future__ import annotations

from chatlora.config.sources import IdentityConfig
from chatlora.data.formats import Conversation, to_conversations
from chatlora.data.read import RawRow, read_rows

SOURCE = "identity"
TEMPLATES = "chatlora:examples/identity/{}.jsonl"


def identity_conversations(cfg: IdentityConfig, system_prompt: str | None = None) -> list[Conversation]:
    """The identity conversations for `cfg` ([] while cfg.name is None)."""
    if cfg.name is None:
        return []
    languages = ("en", "zh") if cfg.language == "both" else (cfg.language,)
    rows = []
    for language in languages:
        for row in read_rows(TEMPLATES.format(language)):
            rows.append(RawRow(SOURCE, f"{language} {row.where}", _filled(row.value, cfg)))
    conversations = to_conversations(rows, "openai", system_prompt)
    for conv in conversations:
        conv.group = SOURCE
    return conversations


def _filled(value, cfg: IdentityConfig):
    if isinstance(value, str):
        return value.replace("{{name}}", cfg.name or "").replace("{{author}}", cfg.author)
    if isinstance(value, list):
        return [_filled(v, cfg) for v in value]
    if isinstance(value, dict):
        return {k: _filled(v, cfg) for k, v in value.items()}
    return value
