"""A config's data, tokenized with its model's tokenizer: the pre-flight of `chatlora data check`,
`plan` and `train`. No weights are loaded.

The model side lives here (the source, tokenizer and generation config, model/load.py); the data
side is data/prepare.py and data/pipeline.py, which never import a model.
"""

from __future__ import annotations

from collections.abc import Callable

from chatlora.config.schema import Config
from chatlora.data.pipeline import Checked, renderer_for, report
from dataclasses import asdict

from chatlora.data.prepare import Loaded, Prepared, cache_root, load_sources, prepare, read_conversations, tokenize_split, tokenizer_fingerprint
from chatlora.model.source import resolve


def load_data(cfg: Config, echo: Callable[[str], None] = print) -> Checked:
    """The data steps without the report: rows read and checked, tokenizer and template loaded,
    samples tokenized (or loaded from the cache). `check_data` runs this, then reports and checks;
    the other processes of a multi-process run take this alone, after rank 0 has checked the data.

    Raises DataError (bad rows, before anything is loaded) or ModelError (tokenizer not found).
    """
    loaded = _streamed_validation(cfg) if cfg.data.streaming else load_sources(cfg.data, preference=cfg.stage == "dpo")
    for path, fmt in loaded.formats.items():
        echo(f"data: {path} ({fmt})")
    source = resolve(cfg.model)
    # Imported only now: torch and transformers take seconds to import, and a bad row or a model path
    # that does not exist is reported before that cost.
    from chatlora.model.load import fix_pad_token, load_generation_config, load_tokenizer, stop_ids

    tokenizer = load_tokenizer(source, cfg.model)
    generation_config = load_generation_config(source, cfg.model, tokenizer)
    renderer, end_of_turn = renderer_for(cfg, tokenizer, stop_ids(generation_config))
    note = fix_pad_token(tokenizer, end_of_turn)
    if note:
        echo(note)
    if cfg.data.streaming:  # the training rows are checked as they are tokenized, after the tokenizer loads
        from chatlora.data.stream import stream_split

        fingerprint = tokenizer_fingerprint(tokenizer, renderer)
        val = loaded.validation
        val_split = tokenize_split("validation", val, renderer, cfg.data, cache_root(cfg.data), fingerprint) if val else None
        data = Prepared(stream_split(cfg.data, renderer, fingerprint), val_split, val)
        echo(f"data: {data.train.rows:,} training rows streamed" + (" [from cache]" if data.train.cached else ""))
    else:
        data = prepare(cfg.data, tokenizer, renderer, loaded.train, loaded.validation)
    summary = {"formats": loaded.formats, "sources": [asdict(count) for count in loaded.sources]}
    return Checked(source, tokenizer, generation_config, renderer, data, summary)


def _streamed_validation(cfg: Config) -> Loaded:
    """With data.streaming, only the validation file is read up front (the training rows stream later)."""
    formats: dict[str, str] = {}
    validation = cfg.data.validation
    val = read_conversations([validation], cfg.data, formats) if isinstance(validation, str) else []
    return Loaded([], val, formats, [])


def check_data(cfg: Config, echo: Callable[[str], None] = print, samples: int = 2, color: bool | None = None) -> Checked:
    """Run the data steps and print the pre-flight report (data/pipeline.py: report).

    Raises DataError (bad rows, before anything is loaded), ModelError (tokenizer not found) or
    PreflightError (the rendered data would train the model wrongly).
    """
    checked = load_data(cfg, echo)
    from chatlora.model.load import stop_ids  # after load_data, which imported transformers anyway

    report(cfg, checked, stop_ids(checked.generation_config), echo, samples, color)
    return checked
