"""The `chatlora` command: parse the flags, call the command's recipe (the COMMANDS table), exit
with its code. Errors are printed as errors.py: report says."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from chatlora.errors import ChatloraError, report
from chatlora.flags import parser

__all__ = ["COMMANDS", "main", "parser", "run"]


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices inside transformers/peft are for their developers, not for ours.
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Through the environment, so transformers is not imported (seconds) before a bad data row or
    # config value is reported; set directly as well when it already is.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # bitsandbytes (imported by peft wherever it is installed: the qlora extra) tries, on CPUs with
    # AVX512-BF16, to fetch a 4-bit kernel from a model hub at import through the `kernels` package,
    # and both warn on every command when it cannot ("Failed to load CPU gemm_4bit_forward ... pip
    # install kernels"; offline: "Skipping publisher trust check"); bitsandbytes' own kernels then
    # run, so the warnings say nothing a chatlora user can act on.
    import logging

    for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


def _config(a: argparse.Namespace, extra: list[str] = ()):
    from chatlora.config.load import load_config

    return load_config(a.config, a.overrides + list(extra))


def _plan_flags(a: argparse.Namespace) -> list[str]:
    return ([f"plan.gpu={a.gpu}"] if a.gpu else []) + ([f"plan.gpu_mem={a.gpu_mem}"] if a.gpu_mem else [])


def _chat_args(a: argparse.Namespace) -> dict:
    from chatlora.recipes.chat import Sampling

    sampling = Sampling(a.max_new_tokens, a.temperature, a.top_p, a.top_k, a.repetition_penalty, a.seed)
    return dict(target=a.run, model=a.model, base=a.base, prompt=a.prompt, prompts_file=a.prompts_file, output=a.output,
                system=a.system, sampling=sampling, batch_size=a.batch_size, device=a.device, decode=a.decode)


def _served(a: argparse.Namespace, **more) -> dict:
    """The arguments serve and web share, the limits checked before any model loads."""
    for name in ("max_tokens", "max_batch", "max_body", "max_context"):
        if getattr(a, name, 1) < 1:
            raise ChatloraError(f"--{name.replace('_', '-')} must be at least 1")
    return dict(runs=a.runs, host=a.host, port=a.port, max_tokens=a.max_tokens, device=a.device, decode=a.decode, **more)


def _serve_args(a: argparse.Namespace) -> dict:
    args = _served(a, api_key=a.api_key, max_batch=a.max_batch, max_body=a.max_body, max_context=a.max_context,
                   drain_seconds=a.drain_seconds)
    if not 0 <= a.drain_seconds < float("inf"):
        raise ChatloraError("--drain-seconds must be a number of seconds, 0 or more")
    return args


@dataclass(frozen=True)
class Command:
    """A command: its recipe (module:function under chatlora.recipes) and the recipe's keyword
    arguments made from the parsed flags (a config is loaded and checked there, before anything starts)."""

    recipe: str
    args: Callable[[argparse.Namespace], dict]
    launches: bool = False
    """With --gpus N: the command runs on N processes (recipes/launch.py)."""


COMMANDS = {
    "train": Command("train:train", lambda a: {"cfg": _config(a)}, launches=True),
    "plan": Command("plan:plan", lambda a: {"cfg": _config(a, _plan_flags(a))}),
    "data check": Command("data_check:data_check", lambda a: {"cfg": _config(a), "samples": a.samples}),
    "chat": Command("chat:chat", _chat_args),
    "eval": Command("eval:evaluate", lambda a: dict(
        target=a.run, data=a.data, model=a.model, max_new_tokens=a.max_new_tokens, limit=a.limit,
        batch_size=a.batch_size, out=a.out, device=a.device)),
    "merge": Command("merge:merge", lambda a: dict(
        target=a.run, out=a.out, model=a.model, dtype=a.dtype, data=a.data, prompts=a.prompts, max_diff=a.max_diff,
        min_top1=a.min_top1, device=a.device)),
    "export": Command("export:export", lambda a: dict(
        target=a.run, out=a.out, fmt=a.fmt, quant=a.quant, model=a.model, data=a.data, prompts=a.prompts,
        max_new_tokens=a.max_new_tokens, min_top1=a.min_top1, llama_cpp_dir=a.llama_cpp_dir, get_converter=a.get_converter, device=a.device)),
    "serve": Command("serve:serve", _serve_args),
    "web": Command("web:web", _served),
    "config presets": Command("config:presets", lambda a: {}),
    "config keys": Command("config:keys", lambda a: {}),
    "config show": Command("config:show", lambda a: {"config": a.config, "overrides": a.overrides}),
}


def run(args: argparse.Namespace) -> int:
    """Call the command's recipe with its arguments; returns the exit code."""
    # First: reading a config imports transformers' TrainingArguments, and with it peft and bitsandbytes.
    _quiet_libraries()
    name = " ".join(filter(None, (args.command, getattr(args, "data_command", None), getattr(args, "config_command", None))))
    command = COMMANDS[name]
    kwargs = command.args(args)
    if command.launches:
        from chatlora.recipes.launch import launched

        code = launched(args.gpus, [args.command, args.config, *args.overrides], kwargs.get("cfg"))
        if code is not None:
            return code
    module, function = command.recipe.split(":")
    getattr(importlib.import_module(f"chatlora.recipes.{module}"), function)(**kwargs)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    # Overrides may follow a command's flags (`plan --gpu h100 lora.r=16`, `data check --samples 0
    # lora.r=4`); argparse stops collecting a positional list at the first flag, so they are picked up here.
    args, rest = p.parse_known_args(argv)
    if rest:
        if hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
            args.overrides = args.overrides + rest
        else:
            p.error(f"unrecognized arguments: {' '.join(rest)}")
    if not args.command:
        p.print_help()
        return 2
    try:
        return run(args)
    except (ChatloraError, RuntimeError, KeyboardInterrupt) as e:
        code = report(e)  # the message, without a traceback: errors.py
        if code is None:
            raise
        return code
