"""The data pipeline's steps after the tokenizer is loaded, and the held-out conversations of a run.

The model side (the model's source, its tokenizer and generation config) is loaded by
model/tokenized.py, which runs these steps in order: rows read and checked (data/prepare.py) →
template probed (`renderer_for`) → samples tokenized (data/prepare.py) → the pre-flight report and
its checks (`report`). Nothing here loads a model or imports one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatlora.config.schema import Config, DataConfig
from chatlora.data import preflight
from chatlora.data.formats import Conversation
from chatlora.data.pairs import as_conversation
from chatlora.data.prepare import Prepared, load_conversations, read_conversations
from chatlora.data.render import Renderer, RenderError
from chatlora.errors import ChatloraError, PreflightError
from chatlora.run import target_config


@dataclass
class Checked:
    """Everything the data steps produced, for train to go on with."""

    source: object
    """Where the model comes from (model/source.py: Source)."""
    tokenizer: object
    generation_config: object
    renderer: Renderer
    data: Prepared
    report: dict


def renderer_for(cfg: Config, tokenizer, stops: list[int]) -> tuple[Renderer, int | None]:
    """The renderer of `cfg.data` with this tokenizer, and its end-of-turn token. Renders a probe
    conversation, so a broken template fails here, once, as a PreflightError."""
    try:
        renderer = Renderer(tokenizer, set(stops), cfg.data.train_on, cfg.data.reasoning)
        return renderer, renderer.end_of_turn(strict=True)
    except RenderError as e:
        raise PreflightError(f"the chat template of {cfg.model.name}: {e}") from None


def report(cfg: Config, checked: Checked, stops: list[int], echo: Callable[[str], None] = print, samples: int = 2,
           color: bool | None = None) -> None:
    """Print the pre-flight report of tokenized data: each split's rows, samples and tokens, a length
    histogram, rendered samples with their trained tokens marked, and the stop tokens.

    Raises PreflightError when the rendered data would train the model wrongly.
    """
    tokenizer, data, summary = checked.tokenizer, checked.data, checked.report
    end_of_turn = checked.renderer.end_of_turn()
    for split in filter(None, (data.train, data.validation)):
        lengths, trained = _sizes(split.dataset)
        summary[split.name] = {"rows": split.rows, "samples": len(lengths), "tokens": sum(lengths),
                               "trained_tokens": trained, "longest": max(lengths, default=0), "rules": split.rules}
        echo(f"{split.name}: {split.rows} rows -> {len(lengths)} samples, {sum(lengths):,} tokens "
             f"({trained:,} trained), longest {max(lengths, default=0)} of max_length {cfg.data.max_length}"
             + (" [tokenized earlier: from cache]" if split.cached else ""))
        if split.rules:
            echo("  truncation: " + ", ".join(f"{k} {v}" for k, v in sorted(split.rules.items())))
        if split is data.train and len(summary.get("sources", [])) > 1:
            _per_source(split.dataset, summary["sources"], echo)
    echo("sample lengths (tokens):")
    for line in preflight.histogram(_sizes(data.train.dataset)[0]):
        echo(line)
    shown = min(samples, len(data.train.dataset))
    if shown:
        marked = "in green" if (color if color is not None else sys.stdout.isatty()) else "inside [[ ]]"
        echo(f"rendered samples (trained tokens {marked}):")
    for i in range(shown):
        row = data.train.dataset[i]
        echo(f"--- {row['origin']}")
        echo(preflight.show_sample(row["input_ids"], row["labels"], tokenizer, color))
    result = preflight.check(data.train.dataset, tokenizer, stops, end_of_turn)
    eot = preflight.token_text(tokenizer, end_of_turn) if end_of_turn is not None else None
    echo(f"end-of-turn token: {eot}; generation stops on: "
         + ", ".join(preflight.token_text(tokenizer, i) for i in stops) + f"; pad token: {tokenizer.pad_token}")
    for note in checked.renderer.notes():
        echo(note)
    if result.failures:
        raise PreflightError("pre-flight failed:\n" + "\n".join(f"  - {f}" for f in result.failures))
    echo("pre-flight: ok")


def _sizes(dataset) -> tuple[list[int], int]:
    lengths, trained = preflight.sample_sizes(dataset)
    return lengths, sum(trained)


def _per_source(dataset, sources: list[dict], echo: Callable[[str], None]) -> None:
    """One line per training source after mixing: rows read, dropped, held out; samples and tokens."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.table({"source": dataset.data.column("source"), "n": pc.list_value_length(dataset.data.column("input_ids"))})
    tokens = {row["source"]: row["n_sum"] for row in table.group_by("source").aggregate([("n", "sum")]).to_pylist()}
    total = sum(tokens.values()) or 1
    for count in sources:
        t = tokens.get(count["name"], 0)
        dropped = [f"{count['duplicates']} duplicates dropped"] if count["duplicates"] else []
        dropped += [f"{count['held_out']} held out"] if count["held_out"] else []
        count["tokens"] = t
        echo(f"  {count['name']}: {count['rows']} rows" + (f" ({', '.join(dropped)})" if dropped else "")
             + f" -> {count['samples']} drawn, {t:,} tokens ({100 * t / total:.1f}%)")


def held_out(target: str | Path, data: str | None) -> tuple[list[Conversation], str]:
    """The conversations to evaluate on and a name for them: `data`, else the run's validation split.

    Raises DataError for bad rows (every one listed), ChatloraError when there is nothing to evaluate on.
    """
    cfg = target_config(target)
    if data:
        data_cfg = cfg.data if cfg else DataConfig(train=[data])
        return read_conversations([data], data_cfg, {}), Path(data).stem
    if cfg is None:
        raise ChatloraError(f"{target} is not inside a run folder, so it has no validation data; give one with --data FILE")
    if cfg.data.validation is None:
        raise ChatloraError(f"{target} was trained without held-out data (data.validation); give some with --data FILE")
    if cfg.stage == "dpo":  # a preference run's held-out prompts, answered by their chosen replies
        return [as_conversation(row) for row in load_conversations(cfg.data, preference=True)[1]], "validation"
    return load_conversations(cfg.data)[1], "validation"
