"""Data files → checked conversations → tokenized, masked samples, cached by content.

Validation reads every file before any model is loaded, so a bad row costs seconds, not a model load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from chatlora.config.schema import DataConfig
from chatlora.config.sources import SourceConfig, as_source
from chatlora.data.formats import Conversation, detect_format, map_columns, to_conversations
from chatlora.data.identity import SOURCE as IDENTITY, identity_conversations
from chatlora.data.mix import SourceCount, dedup, mix
from chatlora.data.pairs import Preference, as_conversation, read_preferences, render_preference
from chatlora.data.fitting import fit_each
from chatlora.data.read import MalformedLines, read_rows, source_files
from chatlora.data.render import Renderer, RenderError
from chatlora.errors import DataError, Problem, refuse_file_in_the_way

# Bump when the rendering or masking logic changes, so old caches are not reused.
PIPELINE_VERSION = 3  # 3: per-turn samples, replies found by sentinel, reasoning; 2: row indices, not file and line


@dataclass
class Split:
    """One tokenized split and what happened to its rows."""

    name: str
    dataset: object
    """datasets.Dataset with input_ids, labels, origin (file:place) and cut (truncated by policy)."""
    rows: int
    """Conversations read."""
    rules: dict[str, int] = field(default_factory=dict)
    """How many rows each truncation rule touched."""
    cached: bool = False
    key: str = ""
    """The content hash of the split (its cache key): the same rows, settings and tokenizer give the
    same key. Checkpoints store it, so a resume on other data is noticed."""


@dataclass
class Prepared:
    train: Split
    validation: Split | None
    val_conversations: list[Conversation]


Group = tuple[SourceConfig, list[Conversation]]


def read_sources(entries: list[str | SourceConfig], cfg: DataConfig, formats: dict[str, str], preference: bool = False) -> list[Group]:
    """Every row of every source (each file of a folder or glob), renamed by the source's columns,
    converted and checked: one DataError lists all bad rows of all sources. `formats` gets each file's.
    With `preference`, the rows are preference rows (data/pairs.py: Preference), not conversations."""
    groups, problems, hints = [], [], []
    for entry in entries:
        source, conversations = as_source(entry), []
        try:
            files = source_files(source.path)
        except DataError as e:
            problems += e.problems
            continue
        system_prompt = source.system_prompt if source.system_prompt is not None else cfg.system_prompt
        for path in files:
            mine = []
            try:
                try:
                    rows = read_rows(path)
                except MalformedLines as e:  # the lines that parsed are checked too: one run lists every problem
                    mine, rows = e.problems, e.rows
                if rows and preference:
                    formats[path], checked = read_preferences(map_columns(rows, source.columns, source.roles), path, "auto", system_prompt)
                    conversations += checked
                elif rows:
                    rows = map_columns(rows, source.columns, source.roles)
                    fmt = cfg.format if cfg.format != "auto" else detect_format(rows, path)
                    formats[path] = fmt
                    for conv in to_conversations(rows, fmt, system_prompt, source.columns):
                        conv.group, conv.train_on = source.path, source.train_on
                        conversations.append(conv)
            except DataError as e:
                mine += e.problems
                if e.hint and e.hint not in hints:
                    hints.append(e.hint)
            problems += sorted(mine, key=_line_number)  # syntax and field problems in the file's order
        groups.append((source, conversations))
    if problems:
        if any(p.where for p in problems):  # not for a whole-file problem (a missing or empty file)
            hints.append("Fix the rows above, or remove them, and run again.")
        raise DataError(problems, hint="\n".join(hints))
    return groups


def read_conversations(paths: list[str], cfg: DataConfig, formats: dict[str, str], preference: bool = False) -> list[Conversation]:
    """Every row of every file, converted and checked; one DataError lists all bad rows of all files."""
    return [conv for _, conversations in read_sources(paths, cfg, formats, preference) for conv in conversations]


def _line_number(problem: Problem) -> int:
    number = problem.where.rpartition(" ")[2]
    return int(number) if number.isdigit() else 0


@dataclass
class Loaded:
    """The conversations of a config's data, before tokenizing."""

    train: list[Conversation]
    """One epoch's conversations after deduplication, the held-out split and mixing (with
    `preference`: preference rows, data/pairs.py)."""
    validation: list[Conversation]
    formats: dict[str, str]
    """Each file's row format."""
    sources: list[SourceCount]
    """What each training source gave (identity last, when set)."""


def load_sources(cfg: DataConfig, preference: bool = False) -> Loaded:
    """Read every source (and the identity set), drop conversations an earlier source holds (data.dedup),
    hold out the validation rows (a file, or a fraction of all training rows split off with `seed`),
    then mix what is left by each source's weight or samples (data/mix.py). Preference rows
    (`preference`) are mixed and held out alike; the identity set and deduplication, which are about
    conversations, leave them alone."""
    formats: dict[str, str] = {}
    groups = read_sources(cfg.train, cfg, formats, preference)
    identity = [] if preference else identity_conversations(cfg.identity, cfg.system_prompt)
    if identity:
        groups.append((SourceConfig(path=IDENTITY), identity))
    counts = [SourceCount(source.path, len(conversations)) for source, conversations in groups]
    if cfg.dedup and len(groups) > 1 and not preference:
        groups, dropped = dedup(groups)
        for count, n in zip(counts, dropped):
            count.duplicates = n
    val: list[Conversation] = []
    if isinstance(cfg.validation, str):
        val = read_conversations([cfg.validation], cfg, formats, preference)
    elif isinstance(cfg.validation, float):
        total = sum(len(c) for _, c in groups)
        order = list(range(total))
        random.Random(cfg.seed).shuffle(order)
        held = set(order[: max(1, round(total * cfg.validation))])
        start, kept = 0, []
        for (source, conversations), count in zip(groups, counts):
            val += [c for i, c in enumerate(conversations, start) if i in held]
            kept.append((source, [c for i, c in enumerate(conversations, start) if i not in held]))
            count.held_out = len(conversations) - len(kept[-1][1])
            start += len(conversations)
        groups = kept
    train, drawn = mix(groups, cfg.seed)
    for count, n in zip(counts, drawn):
        count.samples = n
    if not train:
        raise DataError([Problem(", ".join(as_source(e).path for e in cfg.train), "", "", "no training rows")])
    return Loaded(train, val, formats, counts)


def load_conversations(cfg: DataConfig, preference: bool = False) -> tuple[list[Conversation], list[Conversation], dict[str, str]]:
    """(train, validation, formats) of `load_sources`."""
    loaded = load_sources(cfg, preference)
    return loaded.train, loaded.validation, loaded.formats


def cache_root(cfg: DataConfig) -> Path:
    base = cfg.cache_dir or os.environ.get("CHATLORA_CACHE") or Path.home() / ".cache" / "chatlora"
    key = "data.cache_dir" if cfg.cache_dir else "CHATLORA_CACHE" if os.environ.get("CHATLORA_CACHE") else "~/.cache/chatlora"
    refuse_file_in_the_way(Path(base), key, "unset: ~/.cache/chatlora")
    return Path(base) / "tokens"


def tokenizer_fingerprint(tokenizer, renderer: Renderer) -> str:
    """Changes whenever the tokenizer's vocabulary, template or special tokens change."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps([tokenizer.pad_token_id, tokenizer.eos_token_id, sorted(renderer.end_ids)]).encode())
    return h.hexdigest()


def cache_key(conversations: list[Conversation], cfg: DataConfig, fingerprint: str) -> str:
    h = hashlib.sha256()
    settings = {k: v for k, v in asdict(cfg).items() if k in ("max_length", "overlong", "train_on", "reasoning")}
    h.update(json.dumps([PIPELINE_VERSION, settings, fingerprint]).encode())
    for c in conversations:
        h.update(json.dumps(c.messages, ensure_ascii=False).encode())
        if c.train_on is not None:  # a source's own train_on (None keeps the keys of before it existed)
            h.update(f"train_on={c.train_on}".encode())
    return h.hexdigest()[:24]


def tokenize_split(name: str, conversations: list[Conversation], renderer: Renderer, cfg: DataConfig, cache: Path | None, fingerprint: str) -> Split:
    """Tokenize one split, or load it from the cache when the same rows, settings and tokenizer were
    seen before. Raises DataError listing rows the template cannot render or that are too long
    under overlong='error'."""
    import datasets

    datasets.disable_progress_bars()  # our own bar says what is happening; theirs would add two more
    key = cache_key(conversations, cfg, fingerprint)
    folder = cache / key if cache else None
    found = load_split(folder, name, key) if folder is not None else None
    if found is not None:
        found.dataset = _with_origin(found.dataset, conversations)
        return found
    columns: dict[str, list] = {"input_ids": [], "labels": [], "row": [], "cut": []}
    counts: Counter[str] = Counter()
    problems, unrendered = [], 0
    items = ((index, conv.messages, conv.train_on) for index, conv in enumerate(conversations))
    fitted_rows = fit_each(items, renderer, cfg.max_length, cfg.overlong, cfg.num_proc)
    for index, fitted in tqdm(fitted_rows, total=len(conversations), desc=f"tokenizing {name}", unit="row", leave=False):
        conv = conversations[index]
        counts.update(fitted.rules)
        problem = fitted.problem(conv.source, conv.where, cfg.max_length)
        if problem:
            problems.append(problem)
        if fitted.error is not None:
            unrendered += 1
            continue
        for sample, cut in fitted.samples:  # several when the template renders earlier turns differently (render.py)
            columns["input_ids"].append(sample.input_ids)
            columns["labels"].append(sample.labels)
            columns["row"].append(index)
            columns["cut"].append(cut)
    if problems:
        hints = ["The model's chat template cannot render these rows as they are: fix the rows, or use a model "
                 "whose template takes them."] if unrendered else []
        if len(problems) > unrendered:
            hints.append("Raise data.max_length, or set data.overlong=drop or truncate.")
        raise DataError(problems, hint="\n".join(hints))
    if not columns["input_ids"]:
        files = ", ".join(sorted({c.source for c in conversations}))
        raise DataError([Problem(files, "", "", f"no {name} sample is left: all {len(conversations)} rows were dropped "
                                 f"because their reply alone is longer than data.max_length={cfg.max_length}")],
                        hint="Raise data.max_length, or set data.overlong=truncate.")
    dataset = datasets.Dataset.from_dict(columns)
    split = Split(name, dataset, len(conversations), dict(counts), key=key)
    if folder is not None:
        save_split(folder, dataset, split)
    split.dataset = _with_origin(split.dataset, conversations)
    return split


def load_split(folder: Path, name: str, key: str) -> Split | None:
    """The split cached in `folder`, memory-mapped, or None (a damaged entry is removed, to be made again)."""
    if not (folder / "split.json").is_file():
        return None
    try:
        meta = json.loads((folder / "split.json").read_text())
        return Split(name, _load(folder, meta), meta["rows"], meta["rules"], cached=True, key=key)
    except (OSError, ValueError, KeyError):  # pyarrow's errors are ValueErrors
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _with_origin(dataset, conversations: list[Conversation]):
    """The dataset with each sample's `origin` (file and line or index, for messages) and `source` (its
    data.train entry) taken from this run's conversations. The cache is keyed by content, not by path:
    an entry made from a copy of the file elsewhere must still name the file the user gave."""
    rows = dataset["row"]
    dataset = dataset.add_column("origin", [f"{conversations[i].source}:{conversations[i].where}" for i in rows])
    return dataset.add_column("source", [conversations[i].group or conversations[i].source for i in rows])


def save_split(folder: Path, dataset, split: Split, arrow_files: list[str] | None = None) -> None:
    """Write to a temporary folder and rename, so a killed run never leaves a half cache entry.
    `arrow_files`: Arrow files that already hold the dataset (a streamed split, written as it was
    read): moved in, not copied, since such a split may be larger than memory and than a second copy."""
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"rows": split.rows, "rules": split.rules}
    if arrow_files:
        (tmp / "arrow").mkdir()
        meta["arrow"] = [f"{i:05d}.arrow" for i in range(len(arrow_files))]
        for source, name in zip(arrow_files, meta["arrow"]):
            shutil.move(source, tmp / "arrow" / name)
    else:
        dataset.save_to_disk(str(tmp / "data"))
    (tmp / "split.json").write_text(json.dumps(meta))
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote the same entry first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    # Reload from disk so the split is memory-mapped like a cache hit.
    split.dataset = _load(folder, json.loads((folder / "split.json").read_text()))


def _load(folder: Path, meta: dict):
    import datasets

    if "arrow" not in meta:
        return datasets.load_from_disk(str(folder / "data"))
    parts = [datasets.Dataset.from_file(str(folder / "arrow" / name)) for name in meta["arrow"]]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def prepare(cfg: DataConfig, tokenizer, renderer: Renderer, train: list[Conversation], val: list[Conversation], use_cache: bool = True) -> Prepared:
    """Tokenize the checked conversations of `load_conversations` (from the cache when it can), or
    its preference rows (data/pairs.py)."""
    fingerprint = tokenizer_fingerprint(tokenizer, renderer)
    if train and isinstance(train[0], Preference):
        val_split = tokenize_preferences("validation", val, renderer, cfg, fingerprint) if val else None
        return Prepared(tokenize_preferences("train", train, renderer, cfg, fingerprint), val_split, [as_conversation(r) for r in val])
    cache = cache_root(cfg) if use_cache else None
    train_split = tokenize_split("train", train, renderer, cfg, cache, fingerprint)
    val_split = tokenize_split("validation", val, renderer, cfg, cache, fingerprint) if val else None
    return Prepared(train_split, val_split, val)


# How a pair too long for data.max_length is counted in a split's rules.
PAIR_TOO_LONG = "pair longer than max_length: dropped"


def tokenize_preferences(name: str, rows: list[Preference], renderer: Renderer, cfg, fingerprint: str):
    """One split of preference rows as a datasets.Dataset (input_ids/labels: the chosen sample or the
    KTO reply; rejected_input_ids/rejected_labels, or label). A pair longer than data.max_length is
    dropped (data.overlong=error: refused). Raises DataError listing every row the template cannot
    render. Not cached on disk: rendering a preference set takes seconds; the split's `key` still
    names its content, for the resume check."""
    import datasets

    kto = rows[0].label is not None
    columns: dict[str, list] = {"input_ids": [], "labels": [], "row": [], "cut": []}
    columns.update({"label": []} if kto else {"rejected_input_ids": [], "rejected_labels": []})
    problems, dropped, origin = [], 0, []
    for index, row in enumerate(rows):
        try:
            chosen, rejected = render_preference(renderer, row)
        except RenderError as e:
            problems.append(Problem(row.source, row.where, "", str(e)))
            continue
        longest = max(len(chosen), len(rejected) if rejected else 0)
        if longest > cfg.max_length:
            if cfg.overlong == "error":
                problems.append(Problem(row.source, row.where, "", f"{longest} tokens, longer than data.max_length={cfg.max_length}"))
            dropped += 1
            continue
        columns["input_ids"].append(chosen.input_ids)
        columns["labels"].append(chosen.labels)
        if kto:
            columns["label"].append(row.label)
        else:
            columns["rejected_input_ids"].append(rejected.input_ids)
            columns["rejected_labels"].append(rejected.labels)
        columns["row"].append(index)
        columns["cut"].append(False)
        origin.append(f"{row.source}:{row.where}")
    if problems:
        raise DataError(problems, hint="Fix these rows, or raise data.max_length.")
    if not columns["input_ids"]:
        raise DataError([Problem(rows[0].source, "", "", f"no {name} pair is left: all are longer than data.max_length={cfg.max_length}")],
                        hint="Raise data.max_length.")
    h = hashlib.sha256(json.dumps([PIPELINE_VERSION, "preference", cfg.max_length, cfg.overlong, fingerprint]).encode())
    for row in rows:
        h.update(json.dumps([row.prompt, row.chosen, row.rejected, row.label], ensure_ascii=False).encode())
    dataset = datasets.Dataset.from_dict(columns).add_column("origin", origin)
    return Split(name, dataset, len(rows), {PAIR_TOO_LONG: dropped} if dropped else {}, key=h.hexdigest()[:24])
