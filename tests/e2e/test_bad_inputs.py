"""A corpus of broken inputs, each run through the real command line: broken data files, configs,
chat templates and resume targets must each end with one clear `error:` paragraph that names the
file, row, field or key, exit code 2, no traceback, and an existing run folder left byte for byte as
it was (no half-made new one either).

Small inputs are files in tests/e2e/bad_inputs/; big, binary, unreadable ones are made here at run time.
The commands run concurrently (each is mostly process start-up), then each case is its own test.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from chatlora.errors import EXIT_USER_ERROR
from conftest import FIXTURES, run_cli
from snapshot import snapshot

CORPUS = Path(__file__).parent / "bad_inputs"
GOOD_DATA = FIXTURES / "alpaca.json"
TEN_MB = 10 * 1024 * 1024


@dataclass
class Case:
    name: str
    args: list[str]
    """After `chatlora`. Placeholders: {data}/{config}/{template} (the corpus file of that kind named
    by the case), {made} (a file `make` wrote), {base} (the tiny model's config), {model}, {dir} (the
    case's working folder, which holds runs/existing)."""
    expect: list[str]
    """Text the error paragraph must contain, with the same placeholders."""
    make: object = None
    """make(folder, model) -> path: writes a generated input into the case's folder."""
    corpus: str = ""
    """The corpus file the case reads (data/x.json, configs/x.yaml, templates/x.jinja)."""
    extra: list[str] = field(default_factory=list)


def data(file: str, *expect: str, args: tuple[str, ...] = ()) -> Case:
    """A broken data file, through the pre-flight (`chatlora data check`)."""
    return Case(" ".join([f"data/{file}", *args]), ["data", "check", "{base}", "data.train={data}", *args], list(expect), corpus=f"data/{file}")


def made(name: str, make, *expect: str, command: tuple[str, ...] = ("data", "check")) -> Case:
    """A broken input written at run time (too big, binary or unreadable to commit)."""
    return Case(name, [*command, "{base}", "data.train={made}"], list(expect), make=make)


def config(file: str, *expect: str, model: bool = True) -> Case:
    """A broken config file, through `chatlora train` (no output_dir: a new run would go under runs/)."""
    args = ["train", "{config}", "data.train=" + str(GOOD_DATA)] + (["model.name={model}"] if model else [])
    return Case(f"configs/{file}", args, list(expect), corpus=f"configs/{file}")


def template(file: str, *expect: str, args: tuple[str, ...] = ()) -> Case:
    """A model folder whose chat template is broken, through `chatlora data check`."""
    return Case(f"templates/{file}", ["data", "check", "{base}", "model.name={template}", f"data.train={GOOD_DATA}", *args],
                list(expect), corpus=f"templates/{file}")


# ---------------------------------------------------------------- inputs made at run time


def huge_unterminated_row(folder: Path, model: Path) -> Path:
    """One 10 MB row whose JSON never ends (a file cut off while being written)."""
    path = folder / "huge.jsonl"
    path.write_text('{"instruction": "Summarise this.", "output": "' + "words " * (TEN_MB // 6), encoding="utf-8")
    return path


def huge_row_bad_field(folder: Path, model: Path) -> Path:
    """One 10 MB row, valid JSON, whose reply is a number."""
    path = folder / "huge_field.jsonl"
    path.write_text(json.dumps({"instruction": "x" * TEN_MB, "output": 42}) + "\n", encoding="utf-8")
    return path


def gbk(folder: Path, model: Path) -> Path:
    path = folder / "gbk.jsonl"
    path.write_bytes(b'{"instruction": "hi", "output": "ok"}\n' + '{"instruction": "你好", "output": "再见"}\n'.encode("gbk"))
    return path


def utf16(folder: Path, model: Path) -> Path:
    path = folder / "utf16.json"
    path.write_bytes('[{"instruction": "hi", "output": "ok"}]'.encode("utf-16"))
    return path


def gzipped(folder: Path, model: Path) -> Path:
    path = folder / "train.jsonl"
    path.write_bytes(gzip.compress(b'{"instruction": "hi", "output": "ok"}\n'))
    return path


def deeply_nested(folder: Path, model: Path) -> Path:
    path = folder / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    return path


def huge_integer(folder: Path, model: Path) -> Path:
    """A number of 5,000 digits: valid JSON, more digits than Python converts to an int."""
    path = folder / "bigint.jsonl"
    path.write_text('{"instruction": "hi", "output": "ok", "id": ' + "9" * 5000 + "}\n")
    return path


def latin1_config(folder: Path, model: Path) -> Path:
    path = folder / "latin1.yaml"
    path.write_bytes(f"name: café\nmodel: {{name: {model}}}\n".encode("latin-1"))
    return path


def a_file(folder: Path, model: Path) -> Path:
    path = folder / "afile"
    path.write_text("not a folder")
    return path


def a_folder(folder: Path, model: Path) -> Path:
    path = folder / "train.jsonl"
    path.mkdir()
    (path / "part-0.txt").write_text('{"instruction": "hi", "output": "ok"}\n')  # a folder of .jsonl files is read
    return path


def missing(folder: Path, model: Path) -> Path:
    return folder / "no_such_file.json"


def unreadable(folder: Path, model: Path) -> Path:
    if os.geteuid() == 0:
        # root reads any file whatever its mode; this one fails on read as a dying disk does (EIO).
        return Path("/proc/self/mem")
    path = folder / "locked.json"
    path.write_text('[{"instruction": "hi", "output": "ok"}]')
    path.chmod(0)
    return path


def fifo(folder: Path, model: Path) -> Path:
    path = folder / "pipe.jsonl"
    os.mkfifo(path)  # reading it would wait forever for a writer
    return path


def model_copy(folder: Path, model: Path, template: Path | None, weights: bool = False) -> Path:
    """The tiny model's folder with another chat template (None: none at all), weights only if asked
    (the pre-flight reads the tokenizer and configs, never the weights)."""
    out = folder / "model"
    out.mkdir()
    for f in model.iterdir():
        if f.name != "chat_template.jinja" and (weights or f.suffix != ".safetensors"):
            shutil.copy(f, out / f.name)
    if template is not None:
        shutil.copy(template, out / "chat_template.jinja")
    return out


# ---------------------------------------------------------------- the corpus

CASES = [
    # Data files: syntax and encoding.
    data("malformed.json", "{data}:line 3: malformed JSON at column 25: Expecting ',' delimiter"),
    data("malformed_line.jsonl", "{data}:line 2: malformed JSON at column 44: Expecting property name enclosed in double quotes"),
    data("truncated.json", "{data}:line 3: malformed JSON at column 26: a string starts there and never ends (is the file cut off?)"),
    data("truncated.jsonl", "{data}:line 2: malformed JSON at column 34: a string starts there and never ends"),
    data("bom_mid.jsonl", "{data}:line 2: a UTF-8 byte-order mark (BOM) starts this line (were files joined together?)"),
    data("empty.jsonl", "{data}: the file is empty"),
    data("blank.jsonl", "{data}: the file is empty"),
    data("empty_list.json", "{data}: the file holds no rows"),
    data("object_top.json", "{data}: a .json data file must hold a list of rows, not a JSON object"),
    data("string_top.json", "{data}: a .json data file must hold a list of rows, not a string"),
    data("rows_are_lists.jsonl", "{data}: rows fit no known format; keys seen: no object rows at all"),
    data("unknown_format.jsonl", "{data}: rows fit no known format; keys seen: question, answer", "Expected one of alpaca"),
    data("csv_data.csv", "{data}:row 2: 3 cells, but the header names 2 columns"),
    made("invalid UTF-8 (GBK)", gbk, "{made}:line 2: invalid UTF-8 at byte 18 of the line", "iconv -f GBK -t UTF-8"),
    made("UTF-16 with BOM", utf16, "{made}: not UTF-8 JSON: the file is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8"),
    made("gzip named .jsonl", gzipped, "{made}: not UTF-8 JSON: the file is gzip-compressed; decompress it first"),
    made("10 MB row, cut off", huge_unterminated_row, "{made}:line 1: malformed JSON at column 46: a string starts there and never ends"),
    made("10 MB row, reply a number", huge_row_bad_field, "{made}:line 1 [output]: must be a string, got int"),
    made("nested 100000 deep", deeply_nested, "{made}: JSON nested too deeply to be a data row"),
    made("integer of 5000 digits", huge_integer, "{made}:line 1: malformed JSON: Exceeds the limit"),
    # Malformed lines and bad fields of the lines that parse, all in one run, in the file's order.
    data("malformed_and_bad_fields.jsonl", "{data}:line 2 [output]: missing\n  {data}:line 3: malformed JSON at column 34",
         "{data}:line 4 [output]: must be a string, got int"),
    # Data files: fields and roles.
    data("missing_output.json", "{data}:index 1 [output]: missing"),
    # Preference rows (stage: dpo): every bad row of the file named at once.
    data("bad_pairs.jsonl", "{data}:line 1 [rejected]: the same reply as chosen; a pair must differ",
         "{data}:line 2 [rejected]: missing", "{data}:line 3 [chosen[0].role]: must be 'assistant', got 'user'",
         "{data}:line 4 [prompt[0].role]: roles out of order: expected 'user', got 'assistant'", args=("stage=dpo",)),
    data("empty_output.json", "{data}:index 1 [output]: empty reply"),
    data("null_output.json", "{data}:index 0 [output]: must be a string, got NoneType"),
    data("number_output.jsonl", "{data}:line 2 [output]: must be a string, got int"),
    data("empty_instruction.json", "{data}:index 0 [instruction]: empty (and input is empty too)"),
    data("bad_history.json", "{data}:index 0 [history[0]]: must be a [question, answer] pair of strings"),
    data("history_empty.json", "{data}:index 0 [history[0]]: empty reply"),
    data("surrogate.jsonl", "{data}:line 1 [instruction]: holds an unpaired surrogate escape (\\ud800) at character 3"),
    data("text_part_number.jsonl", "{data}:line 1 [messages[0].content]: a text part's \"text\" must be a string"),
    data("missing_content.jsonl", "{data}:line 1 [messages[1].content]: missing"),
    data("content_object.jsonl", "{data}:line 1 [messages[0].content]: must be a string, got dict"),
    data("unknown_role.jsonl", "{data}:line 1 [messages[1].role]: unknown role 'bot'; expected one of assistant, system, user"),
    data("message_not_object.jsonl", "{data}:line 1 [messages[0]]: must be an object with 'role' and 'content'"),
    data("empty_reply.jsonl", "{data}:line 1 [messages[1]]: empty reply"),
    data("assistant_first.jsonl", "{data}:line 1 [messages[0].role]: roles out of order: expected 'user', got 'assistant'"),
    data("two_users.jsonl", "{data}:line 1 [messages[1].role]: roles out of order: expected 'assistant', got 'user'"),
    data("ends_with_user.jsonl", "{data}:line 1: the conversation must end with an assistant reply"),
    data("system_in_middle.jsonl", "{data}:line 1 [messages[1].role]: roles out of order: expected 'assistant', got a system message after the first turn"),
    data("conversations_not_list.json", "{data}:index 0 [conversations]: must be a non-empty list"),
    data("empty_conversations.json", "{data}:index 0 [conversations]: must be a non-empty list"),
    data("sharegpt_missing_value.json", "{data}:index 0 [conversations[1].value]: missing"),
    data("overlong_reply.jsonl", "{data}: no train sample is left: all 1 rows were dropped because their reply alone is longer than data.max_length=64",
         args=("data.max_length=64",)),
    data("overlong_reply.jsonl", "{data}:line 1: the reply alone is longer than data.max_length=64",
         args=("data.max_length=64", "data.overlong=error")),
    # Paths that are not data files.
    made("missing file", missing, "{made}: no such file"),
    made("a folder", a_folder, "{made}: the folder holds no data file (.json, .jsonl, .csv, .parquet, .arrow)"),
    # A hub dataset that is not in the cache, offline: one line naming it and the cache looked in.
    Case("hf: dataset offline", ["data", "check", "{base}", "data.train=hf:nobody/nothing@train"],
         ["hf:nobody/nothing@train: cannot be loaded (ConnectionError", "looked in the cache"]),
    made("unreadable file", unreadable, "{made}: cannot be read: "),
    made("a named pipe", fifo, "{made}: is not a regular file"),
    # Bad data through `train`, aimed at an existing run to resume: nothing of it may change.
    Case("train: stage=dpo from an adapter that is not there", ["train", "{base}", "stage=dpo", "model.adapter={dir}/runs/none",
                                                                 f"data.train={FIXTURES / 'pairs.jsonl'}"],
         ["model.adapter: {dir}/runs/none is neither a run folder with an adapter nor an adapter folder"]),
    Case("train: bad data, resume=auto on an existing run", ["train", "{base}", "data.train={data}", "output_dir={dir}/runs/existing", "resume=auto"],
         ["{data}:line 2: malformed JSON at column 44"], corpus="data/malformed_line.jsonl"),
    # Configs.
    config("unknown_key.yaml", "unknown config key 'lora.rank'; valid keys: r, alpha, dropout, target_modules, use_dora"),
    config("unknown_section.yaml", "unknown config key 'optimizer'"),
    config("unknown_training_key.yaml", "unknown config key 'training.lerning_rate'; did you mean 'training.learning_rate'?"),
    config("wrong_type.yaml", "lora.r: 'eight' is not a valid int"),
    config("wrong_training_type.yaml", "training.per_device_train_batch_size: 'two' is not a valid int"),
    config("negative_lr.yaml", "training.learning_rate: -0.0001 must be a positive number"),
    config("zero_rank.yaml", "lora.r: 0 must be at least 1"),
    config("zero_alpha.yaml", "lora.alpha: 0.0 must be positive"),
    config("pissa_with_dora.yaml", "lora.init=pissa does not work with lora.use_dora"),
    config("empty_targets.yaml", "lora.target_modules: empty; name the modules to adapt"),
    config("report_no_tokens.yaml", "report.max_new_tokens: 0 must be at least 1"),
    config("negative_seed.yaml", "training.seed: -1 must be between 0 and 4294967295"),
    Case("config not UTF-8", ["train", "{made}", f"data.train={GOOD_DATA}"], ["{made}: not UTF-8 text (invalid byte at offset 9)"],
         make=latin1_config),
    Case("output_dir is a file", ["train", "{base}", f"data.train={GOOD_DATA}", "output_dir={made}"],
         ["output_dir={made} is a file; give a folder"], make=a_file),
    Case("output_dir under a file", ["train", "{base}", f"data.train={GOOD_DATA}", "output_dir={made}/run"],
         ["output_dir={made}/run lies under {made}, which is a file"], make=a_file),
    Case("data.cache_dir is a file", ["data", "check", "{base}", f"data.train={GOOD_DATA}", "data.cache_dir={made}"],
         ["data.cache_dir={made} is a file; give a folder"], make=a_file),
    config("bad_choice.yaml", "data.overlong: 'shorten' is not one of drop, truncate, error"),
    config("unknown_target.yaml", "lora.target_modules ['qkv_proj'] matches no layer of this model; its linear layers are: down_proj, "),
    Case("configs/missing_model.yaml", ["data", "check", "{config}", f"data.train={GOOD_DATA}"],
         ["model.name './no/such/model': no such folder or file, and not a hub id like org/name"], corpus="configs/missing_model.yaml"),
    config("not_a_mapping.yaml", "{config}: the top level must be a mapping of sections"),
    config("invalid_yaml.yaml", "{config}: not valid YAML"),
    config("resume_without_output_dir.yaml", "resume=auto continues the run in output_dir"),
    Case("missing config file", ["train", "{dir}/tiny.yml"], ["'{dir}/tiny.yml' is neither a preset (demo, "]),
    Case("model folder without weights", ["train", "{base}", "model.name={made}", f"data.train={GOOD_DATA}"],
         ["could not load the model from '{made}': "], make=lambda folder, model: model_copy(folder, model, model / "chat_template.jinja")),
    # Chat templates.
    template("no_end_of_turn.jinja", "the chat template of {template}: turn 1: the chat template ends a reply with no end-of-turn "
             "token that generation stops on; use a template that ends replies with an end-of-turn token"),
    template("syntax_error.jinja", "the chat template of {template}: the chat template failed: TemplateSyntaxError"),
    template("drops_replies.jinja", "the chat template of {template}: turn 1: the chat template does not write the reply as given, "
             "so its tokens cannot be found"),
    Case("tokenizer without a chat template", ["data", "check", "{base}", "model.name={made}", f"data.train={GOOD_DATA}"],
         ["the chat template of {made}: the tokenizer has no chat template"], make=lambda folder, model: model_copy(folder, model, None)),
    # Resume targets and run folders.
    Case("resume from a path that is not there", ["train", "{base}", f"data.train={GOOD_DATA}", "resume={dir}/runs/gone"],
         ["resume={dir}/runs/gone: no such run folder or checkpoint folder"]),
    Case("resume a run that has no checkpoint", ["train", "{base}", f"data.train={GOOD_DATA}", "resume={dir}/runs/existing"],
         ["resume={dir}/runs/existing: the run has no complete checkpoint"]),
    Case("output_dir holds another run", ["train", "{base}", f"data.train={GOOD_DATA}", "output_dir={dir}/runs/existing"],
         ["the run folder {dir}/runs/existing already exists and is not empty; continue the run in it with resume=auto"]),
]


@pytest.fixture(scope="module")
def results(tiny_model_dir, tiny_run, tmp_path_factory):
    """Every case run once, a few at a time; each in its own folder holding a copy of a finished run."""
    from chatlora.config.load import training_argument_kinds

    training_argument_kinds()  # fills the cache the commands share, so they do not all build it at once
    root = tmp_path_factory.mktemp("bad-inputs")
    base = root / "base.yaml"
    base.write_text(f"name: tiny\nmodel: {{name: {tiny_model_dir}}}\ndata: {{train: {GOOD_DATA}, max_length: 128}}\n"
                    "lora: {r: 4, alpha: 8, dropout: 0.0}\ntraining: {max_steps: 2}\n")
    jobs = []
    for number, case in enumerate(CASES):
        folder = root / f"case{number}"
        shutil.copytree(tiny_run, folder / "runs" / "existing")
        values: dict[str, object] = {"base": base, "model": tiny_model_dir, "dir": folder}
        if case.corpus:
            kind, file = case.corpus.split("/")[0], CORPUS / case.corpus
            values[{"data": "data", "configs": "config", "templates": "template"}[kind]] = (
                model_copy(folder, tiny_model_dir, file) if kind == "templates" else file)
        if case.make:
            values["made"] = case.make(folder, tiny_model_dir)
        jobs.append((case, folder, [a.format(**values) for a in case.args], [e.format(**values) for e in case.expect]))
    # Most commands stop within a fraction of a second; the few that load a tokenizer or the tiny model
    # spend seconds importing torch and transformers, on every core there is.
    with ThreadPoolExecutor(max(2, min(4, os.cpu_count() or 2))) as pool:
        # One thread each: several processes share the cores, and idle OpenMP threads spin.
        outputs = list(pool.map(lambda job: run_cli(*job[2], cwd=job[1], env={"OMP_NUM_THREADS": "1"}), jobs))
    return {case.name: (folder, expect, out) for (case, folder, _, expect), out in zip(jobs, outputs)}, snapshot(tiny_run)


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_gives_one_clear_error_and_changes_nothing(case, results):
    runs, existing = results
    folder, expect, out = runs[case.name]
    assert out.returncode == EXIT_USER_ERROR, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error: ")), None)
    assert start is not None, out.stderr[-3000:]
    paragraph = lines[start:]
    assert all(line.strip() for line in paragraph), f"not one paragraph:\n{out.stderr[-3000:]}"
    text = "\n".join(paragraph)
    for wanted in expect:
        assert wanted in text, f"{wanted!r} not in:\n{text}"
    assert len(text) < 5000, "the error echoes the input back"
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["existing"], "a run folder was left behind"
    assert snapshot(folder / "runs" / "existing") == existing, "the existing run folder changed"
