"""cli.py as a table: every command the parser knows maps to one recipe function, and the arguments
the table builds from its flags are ones that function takes. errors.py: report, which prints what
escapes a recipe and picks the exit code. No model is loaded here."""

from __future__ import annotations

import argparse
import importlib
import inspect

import pytest

from chatlora.cli import COMMANDS, parser
from chatlora.errors import EXIT_INTERRUPTED, ChatloraError, ConfigError, report

# One argv for each command; the config ones read the demo preset (no weights, no data).
ARGV = {
    "train": ["train", "demo", "lora.r=4"],
    "plan": ["plan", "demo", "--gpu", "h100"],
    "data check": ["data", "check", "demo", "--samples", "1"],
    "chat": ["chat", "RUN", "--prompt", "hi", "--temperature", "0"],
    "eval": ["eval", "RUN", "--data", "held.jsonl", "--limit", "2"],
    "merge": ["merge", "RUN", "OUT", "--dtype", "float32"],
    "export": ["export", "RUN", "OUT", "--quant", "q4_k_m"],
    "serve": ["serve", "RUN", "--port", "0"],
    "web": ["web", "RUN", "RUN2"],
    "config presets": ["config", "presets"],
    "config keys": ["config", "keys"],
    "config show": ["config", "show", "demo", "lora.r=16"],
}


def commands_of(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> set[str]:
    """The runnable commands of the parser, `data check` spelled as the table spells it."""
    found = set()
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                inner = commands_of(sub, prefix + (name,))
                found |= inner or {" ".join(prefix + (name,))}
    return found


def test_every_command_is_in_the_table():
    assert commands_of(parser()) == set(COMMANDS) == set(ARGV)


@pytest.mark.parametrize("name", sorted(ARGV))
def test_the_table_calls_a_recipe_with_arguments_it_takes(name):
    command = COMMANDS[name]
    module, function = command.recipe.split(":")
    recipe = getattr(importlib.import_module(f"chatlora.recipes.{module}"), function)
    kwargs = command.args(parser().parse_args(ARGV[name]))
    inspect.signature(recipe).bind(**kwargs)  # raises TypeError on an argument the recipe does not take


def test_flag_values_reach_the_recipe():
    assert COMMANDS["plan"].args(parser().parse_args(ARGV["plan"]))["cfg"].plan.gpu == "h100"
    assert COMMANDS["train"].args(parser().parse_args(ARGV["train"]))["cfg"].lora.r == 4
    chat = COMMANDS["chat"].args(parser().parse_args(ARGV["chat"]))
    assert (chat["prompt"], chat["sampling"].temperature) == ("hi", 0.0)
    assert COMMANDS["web"].args(parser().parse_args(ARGV["web"]))["runs"] == ["RUN", "RUN2"]


def test_report_prints_a_user_error_and_returns_its_code(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert report(ChatloraError("bad rows")) == 2
    assert capsys.readouterr().err == "error: bad rows\n"
    assert report(KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted\n"


def test_report_leaves_a_bug_alone(capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert report(RuntimeError("Connection reset by peer")) is None  # one process: no peer to lose
    assert capsys.readouterr().err == ""


def test_report_a_lost_peer_on_several_processes(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert report(RuntimeError("Connection reset by peer\nmore")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error (rank 1): lost contact with another process of the job (Connection reset by peer)")
    assert report(RuntimeError("a bug")) is None


def test_other_ranks_leave_shared_errors_to_rank_0(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert report(ConfigError("bad key")) == 2
    assert capsys.readouterr().err == ""
    assert report(ChatloraError("only here")) == 2
    assert capsys.readouterr().err == "error (rank 3): only here\n"
