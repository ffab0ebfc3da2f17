"""`chatlora chat` on the tiny model, in-process: the chat session, prompts files, outputs that cannot
be written, and bad input. The terminal chat and the command line in a subprocess: e2e/test_chat_cli.py."""

from __future__ import annotations

import json

import pytest

from chatlora.model.from_run import load_run
from chatlora.recipes.chat import ChatSession, Sampling, load_for_chat, printable, read_prompts
from chatlora.errors import DataError

GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]


def test_session_streams_each_reply_in_pieces(tiny_run):
    loaded = load_for_chat(str(tiny_run), device="cpu")
    session = ChatSession(loaded, Sampling(max_new_tokens=16, temperature=0), system_prompt=None)
    writes: list[str] = []
    stats: list[str] = []
    replies = session.ask("hello", writes.append, stats.append)
    reply = replies["assistant"]
    assert len(writes) > 3 and writes[-1] == "\n"
    assert "".join(writes).strip() == printable(reply.text)
    assert session.history["assistant"] == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply.text}]
    assert len(stats) == 1 and "hit the 16-token limit" in stats[0]


def test_interrupted_reply_is_left_out_of_the_history(tiny_run):
    loaded = load_run(tiny_run, device="cpu")
    session = ChatSession(loaded, Sampling(max_new_tokens=16, temperature=0), None, compare=True)
    session.ask("first", lambda _s: None)
    seen: list[str] = []

    def write(piece: str) -> None:  # Ctrl-C arrives while the adapter's reply is being written
        seen.append(piece)
        if "adapter> " in seen and len(seen) > seen.index("adapter> ") + 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        session.ask("second", write)
    assert [len(session.history[side]) for side in ("base", "adapter")] == [2, 2]


def test_merged_chat_model_answers_as_the_adapter_does(tiny_run):
    """The in-memory merge changes the speed, not the replies."""
    merged = load_for_chat(str(tiny_run), device="cpu")
    adapter = load_run(tiny_run, device="cpu")
    greedy = Sampling(max_new_tokens=12, temperature=0)
    a = ChatSession(merged, greedy, None).ask("hello", lambda _s: None)["assistant"]
    b = ChatSession(adapter, greedy, None).ask("hello", lambda _s: None)["assistant"]
    assert a.ids == b.ids
    assert not hasattr(merged.model, "disable_adapter") and hasattr(adapter.model, "disable_adapter")


def test_printable_defuses_terminal_escapes():
    assert printable("ok\n\tok") == "ok\n\tok"
    assert printable("\x1b[2Jgone\x07") == "\ufffd[2Jgone\ufffd"


def test_prompts_file_splits_at_newlines_only_and_reads_chat_output_back(tiny_run, tmp_path, capsys):
    """JSON strings may hold U+2028 and U+0085 raw (json.dumps(ensure_ascii=False) writes them so, as
    `chat --output` does); str.splitlines() split the lines there and refused valid JSONL."""
    from chatlora.cli import main

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "first\u2028line"}, {"messages": [{"role": "user", "content": "next\u0085line\x1cand\x1d"}]},
            {"prompt": "plain"}]
    prompts.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode() + b"\r\n")
    expected = [[{"role": "user", "content": "first\u2028line"}], [{"role": "user", "content": "next\u0085line\x1cand\x1d"}],
                [{"role": "user", "content": "plain"}]]
    assert read_prompts(str(prompts)) == expected
    out = tmp_path / "replies.jsonl"
    assert main(["chat", str(tiny_run), "--prompts-file", str(prompts), "--output", str(out), *GREEDY]) == 0
    assert "\u2028" in out.read_text("utf-8")  # written raw: the case that was refused
    assert read_prompts(str(out)) == expected  # the replies file is a prompts file again


def test_unreadable_prompt_lines_are_reported_with_the_others(tiny_run, tmp_path, capsys):
    """A number of over 4300 digits (ValueError), JSON nested thousands deep (RecursionError) and an
    unpaired surrogate escape (a tokenizer TypeError, after loading) are bad lines like any other."""
    from chatlora.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([
        '{"prompt": "ok"}',
        '{"prompt": "big", "n": ' + "1" * 5000 + "}",
        "[" * 100_000 + "]" * 100_000,
        '{"prompt": "hi\\ud800"}',
        '{"messages": [{"role": "system", "content": "fine"}, {"role": "user", "content": "a\\udc00b"}]}',
    ]) + "\n")
    with pytest.raises(DataError) as e:
        read_prompts(str(bad))
    msg = str(e.value)
    assert "the data has 4 problems" in msg
    assert f"{bad}:line 2: malformed JSON: Exceeds the limit (4300 digits)" in msg
    assert f"{bad}:line 3: JSON nested too deeply to be a prompt" in msg
    assert f"{bad}:line 4 [prompt]: holds an unpaired surrogate escape (\\ud800) at character 3" in msg
    assert f"{bad}:line 5 [messages[1].content]: holds an unpaired surrogate escape (\\udc00) at character 2" in msg
    bad.write_text('{"prompt": "hi\\ud800"}\n')  # alone, it used to reach the tokenizer
    assert main(["chat", str(tiny_run), "--prompts-file", str(bad), *GREEDY]) == 2
    err = capsys.readouterr().err
    assert "unpaired surrogate" in err and "loading" not in err and "Traceback" not in err


@pytest.mark.parametrize("where, message", [
    ("folder", "is a folder; give a file name"),
    ("missing/replies.jsonl", "the folder {tmp}/missing does not exist"),
    ("prompts.txt/replies.jsonl", "{tmp}/prompts.txt is a file, not a folder"),
    ("prompts.txt", "is the prompts file"),
    ("folder/../prompts.txt", "is the prompts file"),
    ("link.txt", "is the prompts file"),
])
def test_an_output_that_cannot_be_written_is_refused_before_loading(tiny_run, tmp_path, capsys, where, message):
    """A folder, a missing folder or a file as the folder failed only after every reply was generated,
    losing them all; the prompts file itself was overwritten with the replies."""
    from chatlora.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "link.txt").symlink_to(prompts)
    result = main(["chat", str(tiny_run), "--prompts-file", str(prompts), "--output", str(tmp_path / where), *GREEDY])
    err = capsys.readouterr().err
    assert result == 2 and message.format(tmp=tmp_path) in err and "Traceback" not in err
    assert "loading" not in err and prompts.read_text() == "hello\n"


def test_replies_that_cannot_be_written_go_to_stdout(tiny_run, tmp_path, capsys, monkeypatch):
    """A disk that fills up while the replies are generated: they are printed rather than lost (exit 74)."""
    import errno

    import chatlora.recipes.chat as chat_recipe
    from chatlora.cli import main

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(chat_recipe, "write_atomic", full)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nwhy?\n")
    out = tmp_path / "replies.jsonl"
    assert main(["chat", str(tiny_run), "--prompts-file", str(prompts), "--output", str(out), *GREEDY]) == 74
    captured = capsys.readouterr()
    assert [json.loads(line)["prompt"] for line in captured.out.splitlines()] == ["hello", "why?"]
    assert "could not be written (No space left on device); the replies were written to stdout instead" in captured.err
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/run"], "/nonexistent/run: no such run folder"),
    (["{tmp}"], "is neither a chatlora run folder"),
    (["{run}", "--temperature", "-1"], "--temperature: -1.0 must be 0 (greedy) or more"),
    (["{run}", "--prompt", "a", "--prompts-file", "b"], "give --prompt or --prompts-file, not both"),
    # NaN passes `< 0` checks; transformers then refused it with a traceback, after loading.
    (["{run}", "--prompt", "a", "--temperature", "nan"], "--temperature: nan is not a finite number"),
    (["{run}", "--prompt", "a", "--top-p", "nan"], "--top-p: nan is not a finite number"),
    (["{run}", "--prompt", "a", "--repetition-penalty", "inf"], "--repetition-penalty: inf is not a finite number"),
    (["{run}", "--prompt", "a", "--seed", str(2**64)], f"--seed: {2**64} must fit in 64 bits"),
    # Bytes that are not UTF-8 in argv become lone surrogates; the tokenizer refused them with a TypeError.
    (["{run}", "--prompt", "hi\udcff"], "--prompt: not UTF-8 text"),
    (["{run}", "--prompt", "hi", "--system", "\udcffbe brief"], "--system: not UTF-8 text"),
])
def test_bad_input_exits_2(tiny_run, tmp_path, capsys, args, message):
    from chatlora.cli import main

    assert main(["chat", *[a.format(tmp=tmp_path, run=tiny_run) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args", [["chat", "RUN", "--batch-size", "0"], ["eval", "RUN", "--max-new-tokens", "-3"],
                                  ["merge", "RUN", "OUT", "--min-top1", "1.5"], ["eval", "RUN", "--limit", "x"]])
def test_bad_numbers_are_usage_errors(args, capsys):
    from chatlora.cli import main

    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_a_run_given_as_dot_loads_under_its_folder_name(tiny_run, monkeypatch):
    from chatlora.model.from_run import load_run

    monkeypatch.chdir(tiny_run)
    loaded = load_run(".", device="cpu")
    assert loaded.adapters == [tiny_run.name]
