"""Flags checked by argparse before anything loads (ports, devices), and the help texts' promises.
No model is loaded here: every case ends in the parser or a --help."""

from __future__ import annotations

import pytest
import torch

from chatlora.cli import main, parser
from chatlora.errors import ChatloraError
from chatlora.model.decode_modes import resolve_mode


def usage_error(args: list[str], capsys) -> str:
    """argparse's message for `args`; the test fails unless it exits with 2 there."""
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err


@pytest.mark.parametrize("args, message", [
    (["serve", "RUN", "--port", "70000"], "argument --port: 70000 is not a port number: give 0 to 65535"),
    (["serve", "RUN", "--port", "65536"], "argument --port: 65536 is not a port number"),
    (["serve", "RUN", "--port", "-1"], "argument --port: -1 is not a port number"),
    (["serve", "RUN", "--port", "http"], "argument --port: 'http' is not a whole number"),
    (["web", "RUN", "--port", "70000"], "argument --port: 70000 is not a port number: give 1 to 65535"),
    (["web", "RUN", "--port", "0"], "argument --port: 0 is not a port number: give 1 to 65535"),
], ids=["serve-70000", "serve-65536", "serve-negative", "serve-word", "web-70000", "web-0"])
def test_ports_out_of_range_are_usage_errors(args, message, capsys):
    """serve --port 70000 served on 4464 (the socket call takes the port modulo 65536), 65536 on a
    random port; web --port 70000 loaded the model, then failed with an OverflowError traceback."""
    assert message in usage_error(args, capsys)


def test_ports_at_the_ends_of_the_range_are_taken():
    p = parser()
    assert p.parse_args(["serve", "RUN", "--port", "0"]).port == 0
    assert p.parse_args(["serve", "RUN", "--port", "65535"]).port == 65535
    assert p.parse_args(["web", "RUN", "--port", "1"]).port == 1
    assert p.parse_args(["web", "RUN"]).port == 8501 and p.parse_args(["serve", "RUN"]).port == 8000


COMMANDS = [["chat", "RUN"], ["eval", "RUN"], ["merge", "RUN", "OUT"], ["serve", "RUN"], ["web", "RUN"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_bad_device_is_a_usage_error_before_anything_loads(command, capsys):
    """chat/serve/web --device gpu7 ended in torch's RuntimeError traceback (eval and merge after
    loading the tokenizer); --device cuda on a CPU-only torch in an AssertionError traceback."""
    err = usage_error([*command, "--device", "gpu7"], capsys)
    assert "argument --device: 'gpu7' is not a device name; use cpu, cuda or cuda:N" in err
    err = usage_error([*command, "--device", "meta"], capsys)
    assert "argument --device: meta devices cannot run a model here" in err
    if not torch.cuda.is_available():
        err = usage_error([*command, "--device", "cuda"], capsys)
        assert "argument --device:" in err and ("built without CUDA" in err or "no cuda device is available" in err)
    assert parser().parse_args([*command, "--device", "cpu"]).device == "cpu"


def test_device_problem_counts_the_gpus(monkeypatch):
    from chatlora.model.decode_modes import device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda") is None and device_problem("cuda:1") is None and device_problem("cpu") is None
    assert device_problem("cuda:2") == "this machine has 2 cuda devices (cuda:0 to cuda:1)"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_problem("cuda:1") == "this machine has 1 cuda device (cuda:0)"


def test_resolve_mode_refuses_a_bad_device_as_a_chatlora_error():
    """What chat's and serve's recipes ask first, when called from Python rather than the CLI."""
    with pytest.raises(ChatloraError, match="--device gpu7: 'gpu7' is not a device name"):
        resolve_mode("auto", "gpu7")
    assert resolve_mode("auto", "cpu") == "eager"


def help_of(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def test_serve_and_web_help_say_what_they_need(capsys):
    text = help_of(["serve"], capsys)
    for words in ("chatlora serve runs/", "--port 0", "/health", "/v1/models", "/v1/chat/completions",
                  "serving the OpenAI API at"):
        assert words in text, words
    text = help_of(["web"], capsys)
    for words in ("chatlora web runs/", "pip install 'chatlora[web]'", "http://127.0.0.1:8501"):
        assert words in text, words


@pytest.mark.parametrize("args, example", [
    (["config"], "chatlora config show demo"),
    (["config", "keys"], "chatlora config keys"),
    (["config", "show"], "chatlora config show demo lora.r=16"),
    (["config", "presets"], "chatlora config presets"),
    (["data"], "chatlora data check demo"),
    (["data", "check"], "chatlora data check demo"),
])
def test_config_and_data_help_have_a_description_and_an_example(args, example, capsys):
    text = help_of(args, capsys)
    usage, _, rest = text.partition("\n\n")
    assert rest.split("\n")[0].strip() and not rest.startswith(("positional arguments", "options")), "a description"
    assert "example" in text and f"  {example}" in text


@pytest.mark.parametrize("args", [["plan"], ["data", "check"]])
def test_plan_and_data_check_help_show_only_their_exit_codes(args, capsys):
    text = help_of(args, capsys)
    assert "exit codes: 0 ok; 2 bad input" in text
    for training_only in ("NaN/inf", "74 ", "75 ", "resume=auto"):
        assert training_only not in text, training_only


def test_train_help_says_where_the_run_folder_goes(capsys):
    text = help_of(["train"], capsys)
    assert "runs/<name>-<date>-<time>" in text and "output_dir=" in text
    assert "74 a file could not be written" in text  # training's own exit codes stay


def test_eval_help_says_what_name_is(capsys):
    text = " ".join(help_of(["eval"], capsys).split())
    assert "RUN/eval/NAME.json" in text and "NAME is the --data file's name without its extension" in text
    assert "`validation` for the run's own held-out split" in text


def test_overrides_may_follow_any_commands_flags(tiny_model_dir, tmp_path, capsys):
    """argparse stops a positional list at the first flag; overrides after `--samples 0` still count."""
    from conftest import FIXTURES

    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {{name: {tiny_model_dir}}}\ndata: {{train: {FIXTURES / 'alpaca.json'}}}\n")
    assert main(["data", "check", str(config), "--samples", "0", "data.max_length=100"]) == 0
    assert main(["data", "check", str(config), "--samples", "0", "data.max_length=7"]) == 2
    assert "data.max_length: 7 is too small" in capsys.readouterr().err  # the override reached the config
    err = usage_error(["data", "check", "demo", "--samples", "0", "--bogus"], capsys)
    assert "unrecognized arguments: --bogus" in err
