"""`chatlora chat` as a user runs it, in a subprocess: the terminal chat through a real pseudo-terminal,
one-shot and file answers, --base side by side, a bare adapter folder, and a bad prompts file."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pexpect
import pytest

from chatlora.recipes.chat import read_prompts
from chatlora.errors import DataError
from conftest import REPO, run_cli

GREEDY = ["--temperature", "0", "--max-new-tokens", "12"]
STATS = re.compile(r"\[(\d+) tokens, [\d.]+ s, [\d.]+ tok/s, context (\d+) tokens")


def spawn_chat(*args: str) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    return pexpect.spawn(sys.executable, ["-m", "chatlora", "chat", *args], env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 200))


def ask(child: pexpect.spawn, line: str) -> int:
    """Send a line, wait for the reply's stats, return the context length it reports."""
    child.sendline(line)
    child.expect(STATS)
    context = int(child.match.group(2))
    child.expect("you> ")
    return context


def test_terminal_chat_streams_keeps_history_and_resets(tiny_run):
    child = spawn_chat(str(tiny_run), *GREEDY)
    child.expect("adapter merged into the base weights")
    child.expect("system prompt: \\(none")
    child.expect("you> ")
    first = ask(child, "hello")
    second = ask(child, "and again")
    assert second > first + len("and again"), "the second prompt carries the first exchange"
    child.sendline("/history")
    child.expect("user: hello\r\n")
    child.expect("assistant: ")
    child.expect("user: and again\r\n")
    child.expect("you> ")
    child.sendline("/reset")
    child.expect("history cleared")
    child.expect("you> ")
    child.sendline("/history")
    child.expect("\\(no history\\)")
    child.expect("you> ")
    assert ask(child, "hello") == first, "after /reset the same prompt sees the same (empty) history"
    child.sendline("/system Answer like a pirate.")
    child.expect("system prompt set: Answer like a pirate.")
    child.expect("you> ")
    assert ask(child, "hello") > first + len("Answer like a pirate."), "the system prompt is sent"
    child.sendline("/system")
    child.expect("system prompt: Answer like a pirate.")
    child.sendline("/nonsense")
    child.expect("unknown command /nonsense")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_terminal_chat_with_base_answers_twice_and_ends_on_eof(tiny_run):
    child = spawn_chat(str(tiny_run), "--base", *GREEDY)
    child.expect("adapter switchable")
    child.expect("you> ")
    child.sendline("hello")
    child.expect("base> ")
    child.expect(STATS)
    child.expect("adapter> ")
    child.expect(STATS)
    child.expect("you> ")
    child.sendeof()  # Ctrl-D leaves
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_prompt(tiny_run):
    result = run_cli("chat", str(tiny_run), "--prompt", "hello", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "> " not in result.stdout  # the reply alone, for scripts
    assert "warning: the reply hit the 12-token limit" in result.stderr


def test_prompts_file_with_base_writes_jsonl(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n\n"
                       + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "why?"}]}) + "\n")
    out = tmp_path / "replies.jsonl"
    result = run_cli("chat", str(tiny_run), "--base", "--prompts-file", str(prompts), "--output", str(out), *GREEDY)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("prompt") for r in rows] == ["hello", None]
    assert rows[1]["messages"][0]["role"] == "system"
    for row in rows:
        assert set(row) >= {"reply", "stopped", "tokens", "base"} and row["tokens"] == 12 and row["stopped"] is False
        assert set(row["base"]) == {"reply", "stopped", "tokens"}
    assert "replies (base)" in result.stderr and "2/2" in result.stderr  # progress bars


def test_plain_prompts_file_to_stdout(tiny_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nwhat is a cactus?\n")
    result = run_cli("chat", str(tiny_run), "--prompts-file", str(prompts), "--batch-size", "1", *GREEDY)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "what is a cactus?"]


def test_bad_prompts_file_is_reported_before_loading(tmp_path, tiny_run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n{oops\n')
    with pytest.raises(DataError) as e:
        read_prompts(str(bad))
    msg = str(e.value)
    assert f"{bad}:line 2: needs \"prompt\"" in msg
    assert f"{bad}:line 3 [messages[1].role]: the last message must be the user's" in msg
    assert f"{bad}:line 4: malformed JSON at column 2" in msg
    out = tmp_path / "out.jsonl"
    result = run_cli("chat", str(tiny_run), "--prompts-file", str(bad), "--output", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "loading" not in result.stderr and not out.exists()


def test_bare_adapter_folder_with_its_base_model(tiny_run, tiny_model_dir, tmp_path):
    adapter = tmp_path / "my-adapter"
    shutil.copytree(tiny_run / "adapter", adapter)
    result = run_cli("chat", str(adapter), "--model", str(tiny_model_dir), "--prompt", "hello", *GREEDY)
    assert result.returncode == 0, result.stderr
    with_run = run_cli("chat", str(tiny_run), "--prompt", "hello", *GREEDY)
    assert result.stdout == with_run.stdout
