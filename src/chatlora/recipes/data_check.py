"""`chatlora data check`: the pre-flight alone. Reads and checks the data, renders it with the model's
tokenizer and template, shows what will be trained, and fails on what would ruin a run. No weights
are loaded. `train` runs the same steps first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from chatlora.config.schema import Config
from chatlora.data import preflight
from chatlora.data.prepare import Prepared, load_conversations, prepare
from chatlora.data.render import IGNORE, Renderer, RenderError
from chatlora.errors import PreflightError
from chatlora.model.source import Source, resolve


@dataclass
class Checked:
    """Everything the data steps produced, for train to go on with."""

    source: Source
    tokenizer: object
    generation_config: object
    renderer: Renderer
    data: Prepared
    report: dict


def load_data(cfg: Config, echo: Callable[[str], None] = print) -> Checked:
    """The data steps without the report: rows read and checked, tokenizer and template loaded,
    samples tokenized (or loaded from the cache). `check_data` runs this, then reports and checks;
    the other processes of a multi-process run take this alone, after rank 0 has checked the data.

    Raises DataError (bad rows, before anything is loaded) or ModelError (tokenizer not found).
    """
    train_rows, val_rows, formats = load_conversations(cfg.data)
    for path, fmt in formats.items():
        echo(f"data: {path} ({fmt})")
    source = resolve(cfg.model)
    # Imported only now: torch and transformers take seconds to import, and a bad row or a model path
    # that does not exist is reported before that cost.
    from chatlora.model.load import fix_pad_token, load_generation_config, load_tokenizer, stop_ids

    tokenizer = load_tokenizer(source, cfg.model)
    generation_config = load_generation_config(source, cfg.model, tokenizer)
    stops = stop_ids(generation_config)
    try:
        renderer = Renderer(tokenizer, set(stops), cfg.data.train_on, cfg.data.reasoning)
        end_of_turn = renderer.end_of_turn(strict=True)  # renders a probe conversation: a broken template fails here, once
    except RenderError as e:
        raise PreflightError(f"the chat template of {cfg.model.name}: {e}") from None
    note = fix_pad_token(tokenizer, end_of_turn)
    if note:
        echo(note)
    data = prepare(cfg.data, tokenizer, renderer, train_rows, val_rows)
    return Checked(source, tokenizer, generation_config, renderer, data, {"formats": formats})


def check_data(cfg: Config, echo: Callable[[str], None] = print, samples: int = 2, color: bool | None = None) -> Checked:
    """Run the data steps and print the pre-flight report.

    Raises DataError (bad rows, before anything is loaded), ModelError (tokenizer not found) or
    PreflightError (the rendered data would train the model wrongly).
    """
    checked = load_data(cfg, echo)
    from chatlora.model.load import stop_ids  # after load_data, which imported transformers anyway

    tokenizer, data, report = checked.tokenizer, checked.data, checked.report
    stops = stop_ids(checked.generation_config)
    end_of_turn = checked.renderer.end_of_turn()
    for split in filter(None, (data.train, data.validation)):
        lengths = [len(ids) for ids in split.dataset["input_ids"]]
        trained = sum(sum(1 for t in labels if t != IGNORE) for labels in split.dataset["labels"])
        report[split.name] = {"rows": split.rows, "samples": len(lengths), "tokens": sum(lengths),
                              "trained_tokens": trained, "longest": max(lengths, default=0), "rules": split.rules}
        echo(f"{split.name}: {split.rows} rows -> {len(lengths)} samples, {sum(lengths):,} tokens "
             f"({trained:,} trained), longest {max(lengths, default=0)} of max_length {cfg.data.max_length}"
             + (" [tokenized earlier: from cache]" if split.cached else ""))
        if split.rules:
            echo("  truncation: " + ", ".join(f"{k} {v}" for k, v in sorted(split.rules.items())))
    echo("sample lengths (tokens):")
    for line in preflight.histogram([len(ids) for ids in data.train.dataset["input_ids"]]):
        echo(line)
    shown = min(samples, len(data.train.dataset))
    if shown:
        marked = "in green" if (color if color is not None else preflight.sys.stdout.isatty()) else "inside [[ ]]"
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
    return checked
