"""Training data larger than memory (data.streaming): each row read, checked, tokenized and written
to the on-disk cache as it comes, so memory holds a batch of samples, not the data.

Rows come from data/read.py (`iter_rows`: JSONL line by line), go through the same column mapping,
format checks (data/formats.py) and truncation (data/truncate.py) as the in-memory path, and the
samples are written by `datasets.Dataset.from_generator` (Arrow, in batches) into the same cache as
data/prepare.py's, keyed by the files' bytes, so a second run, and a resume, read the same samples
memory-mapped. The problems kept are the first LIMIT; the rest are counted.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from chatlora.config.schema import DataConfig
from chatlora.config.sources import as_source
from chatlora.data.formats import detect_format, map_columns, to_conversations
from chatlora.data.prepare import PIPELINE_VERSION, Split, cache_root, load_split, save_split
from chatlora.data.read import RawRow, iter_rows, resolve_path, source_files
from chatlora.data.fitting import fit_each
from chatlora.data.render import Renderer
from chatlora.errors import DataError, Problem

LIMIT = 20
DETECT_ROWS = 100  # a streamed file's format is voted on by its first rows


@dataclass
class Tally:
    """What a streamed pass met: rows read, truncation rules used, the first problems and a count of the rest."""

    rows: int = 0
    rules: Counter = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)
    more: int = 0
    unrendered: int = 0

    def add(self, problem: Problem) -> None:
        if len(self.problems) < LIMIT:
            self.problems.append(problem)
        else:
            self.more += 1


def stream_key(cfg: DataConfig, fingerprint: str) -> str:
    """The cache key of the streamed training split: the settings, the tokenizer, each source's
    mapping and the bytes of every file (read in blocks; a hub source by its name)."""
    h = hashlib.sha256()
    settings = {k: getattr(cfg, k) for k in ("max_length", "overlong", "train_on", "reasoning", "format", "system_prompt")}
    h.update(json.dumps(["stream", PIPELINE_VERSION, settings, fingerprint]).encode())
    for entry in cfg.train:
        source = as_source(entry)
        h.update(json.dumps([source.columns, source.roles, source.system_prompt, source.train_on]).encode())
        for path in source_files(source.path):
            h.update(path.encode())
            file = resolve_path(path)
            if file.is_file():
                with file.open("rb") as f:
                    while block := f.read(1 << 22):
                        h.update(block)
    return h.hexdigest()[:24]


def stream_split(cfg: DataConfig, renderer: Renderer, fingerprint: str) -> Split:
    """The training split of `cfg`, tokenized as it is read into the cache (or found there); always on
    disk, since the samples may not fit in memory.

    Raises DataError listing the first LIMIT bad rows and counting the rest, once the pass is over.
    """
    import datasets

    datasets.disable_progress_bars()
    key = stream_key(cfg, fingerprint)
    folder = cache_root(cfg) / key
    cached = load_split(folder, "train", key)
    if cached is not None:
        return cached
    tally = Tally()
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")), "labels": datasets.Sequence(datasets.Value("int64")),
                                  "row": datasets.Value("int64"), "cut": datasets.Value("bool"),
                                  "origin": datasets.Value("string"), "source": datasets.Value("string")})
    build = folder.with_name(f"{folder.name}.build")
    shutil.rmtree(build, ignore_errors=True)
    try:
        dataset = datasets.Dataset.from_generator(lambda: _samples(cfg, renderer, tally), features=features,
                                                  cache_dir=str(build), fingerprint=key)
        _raise(tally, cfg)
        split = Split("train", dataset, tally.rows, dict(tally.rules), key=key)
        save_split(folder, dataset, split, [f["filename"] for f in dataset.cache_files])
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return split


def _raise(tally: Tally, cfg: DataConfig) -> None:
    if tally.problems:
        hints = ["The model's chat template cannot render some rows as they are."] if tally.unrendered else []
        hints.append("Fix the rows above, or remove them, and run again (streamed data lists the first "
                     f"{LIMIT} problems and counts the rest).")
        raise DataError(tally.problems, hint="\n".join(hints), more=tally.more)
    if not tally.rows:
        raise DataError([Problem(", ".join(as_source(e).path for e in cfg.train), "", "", "no training rows")])


def _samples(cfg: DataConfig, renderer: Renderer, tally: Tally) -> Iterator[dict]:
    """The samples of every source, in order, fitted in data.num_proc processes (data/fitting.py)."""
    for (row, source), fitted in fit_each(_conversations(cfg), renderer, cfg.max_length, cfg.overlong, cfg.num_proc):
        if fitted is None:  # `row` is a problem found while reading, in its place in the file
            tally.add(row)
            continue
        tally.rules.update(fitted.rules)
        problem = fitted.problem(row.source, row.where, cfg.max_length)
        if problem:
            tally.add(problem)
        if fitted.error is not None:
            tally.unrendered += 1
            continue
        index = tally.rows
        tally.rows += 1
        for sample, cut in fitted.samples:
            yield {"input_ids": sample.input_ids, "labels": sample.labels, "row": index, "cut": cut,
                   "origin": f"{row.source}:{row.where}", "source": source.path}


def _conversations(cfg: DataConfig) -> Iterator[tuple]:
    """((row, source), messages, train_on) for each row of the sources, as data/fitting.py takes them;
    ((problem, None), None, None) for a file or row that cannot be read or converted, in its place (the
    problems reach the tally as the fitted rows do, so their order is the files' whatever num_proc)."""
    for entry in cfg.train:
        source = as_source(entry)
        system_prompt = source.system_prompt if source.system_prompt is not None else cfg.system_prompt
        try:
            files = source_files(source.path)
        except DataError as e:
            for p in e.problems:
                yield (p, None), None, None
            continue
        for path in files:
            items = iter_rows(path)
            head = list(itertools.islice(items, DETECT_ROWS))  # rows and problems, in the file's order
            rows = map_columns([r for r in head if isinstance(r, RawRow)], source.columns, source.roles)
            try:
                fmt = cfg.format if cfg.format != "auto" else detect_format(rows, path) if rows else ""
            except DataError as e:
                for p in e.problems:
                    yield (p, None), None, None
                continue
            for item in itertools.chain(head, items):
                if isinstance(item, Problem):
                    yield (item, None), None, None
                    continue
                (row,) = map_columns([item], source.columns, source.roles)
                if not fmt:  # no row of the head parsed: the first one that does decides
                    try:
                        fmt = detect_format([row], path)
                    except DataError as e:
                        yield (e.problems[0], None), None, None
                        break
                try:
                    (conv,) = to_conversations([row], fmt, system_prompt, source.columns)
                except DataError as e:
                    for p in e.problems:
                        yield (p, None), None, None
                    continue
                yield (row, source), conv.messages, source.train_on
