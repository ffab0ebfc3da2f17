"""The `chatlora` command: parse, call a recipe, print, exit. No logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import warnings

from chatlora import __version__
from chatlora.errors import ChatloraError

EPILOG = """\
CONFIG is a preset name ({presets}) or a YAML file; key=value pairs override it with dotted keys:
  chatlora train demo training.learning_rate=2e-4 lora.r=16
  chatlora train qwen1.5-7b-chat-huanhuan data.train=huanhuan.json
`chatlora config keys` lists every key with its meaning.

exit codes: 0 ok, 2 bad input (config, data, model path; nothing is written), 130 interrupted.
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="demo", help="preset name or YAML file (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.num_train_epochs=1")


def parser() -> argparse.ArgumentParser:
    from chatlora.config.load import preset_names

    epilog = EPILOG.format(presets=", ".join(preset_names()))
    fmt = argparse.RawDescriptionHelpFormatter
    root = argparse.ArgumentParser(
        prog="chatlora", formatter_class=fmt, epilog=epilog,
        description="Turn an open chat model into your own assistant with LoRA.")
    root.add_argument("--version", action="version", version=f"chatlora {__version__}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", formatter_class=fmt, epilog=epilog, help="train a LoRA adapter: data -> run folder",
                       description="Check and tokenize the data, then train a LoRA adapter into a new run folder.")
    _config_args(p)

    data = sub.add_parser("data", help="data tools (check)")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data_sub.add_parser("check", formatter_class=fmt, epilog=epilog, help="the pre-flight alone, no model weights loaded",
                            description="Validate every row, render samples with the chat template (trained tokens marked), "
                                        "show a length histogram, and fail on data that would train the model wrongly.")
    _config_args(p)
    p.add_argument("--samples", type=int, default=3, help="rendered samples to show (default 3)")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API for one or more runs",
                       description="Serve the runs' adapters on their shared base model through an OpenAI-compatible API "
                                   "(/v1/models, /v1/chat/completions, streaming). Each run folder's name is a model "
                                   "name; the base model is one too.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders trained on the same base model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=os.environ.get("CHATLORA_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY' (default: $CHATLORA_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens one request may ask for (default 1024)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests generated together (default 32)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")

    p = sub.add_parser("web", help="the browser chat page (Streamlit)",
                       description="A chat page for the runs: streaming replies, system prompt, temperature, clear history.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders trained on the same base model")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens of one reply (default 1024)")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")

    cfg = sub.add_parser("config", help="show presets, a resolved config, or every config key")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="CONFIG_COMMAND", required=True)
    cfg_sub.add_parser("presets", help="list the shipped presets")
    cfg_sub.add_parser("keys", help="every config key with its default and meaning")
    p = cfg_sub.add_parser("show", help="print a resolved config as YAML")
    _config_args(p)
    return root


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Deprecation notices inside transformers/peft are for their developers, not for ours.
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def run(args: argparse.Namespace) -> int:
    from chatlora.config.load import field_docs, load_config, preset_names, to_dict

    if args.command == "config":
        if args.config_command == "presets":
            print("\n".join(preset_names()))
        elif args.config_command == "keys":
            for key, default, doc in field_docs():
                print(f"{key} = {default}")
                print(textwrap.fill(doc, 96, initial_indent="    ", subsequent_indent="    "))
        else:
            import yaml

            print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), allow_unicode=True, sort_keys=False), end="")
        return 0
    if args.command in ("serve", "web"):
        return _serve(args)
    cfg = load_config(args.config, args.overrides)
    _quiet_libraries()
    if args.command == "train":
        from chatlora.recipes.train import train

        train(cfg)
    elif args.command == "data":
        from chatlora.recipes.data_check import check_data

        check_data(cfg, samples=args.samples)
    return 0


def _serve(args: argparse.Namespace) -> int:
    for name in ("max_tokens", "max_batch", "max_body"):
        if getattr(args, name, 1) < 1:
            raise ChatloraError(f"--{name.replace('_', '-')} must be at least 1")
    _quiet_libraries()
    if args.command == "serve":
        from chatlora.recipes.serve import serve

        serve(args.runs, args.host, args.port, args.api_key, args.max_tokens, args.max_batch, args.max_body, args.device)
    else:
        from chatlora.recipes.web import web

        web(args.runs, args.host, args.port, args.max_tokens, args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.command:
        p.print_help()
        return 2
    try:
        return run(args)
    except ChatloraError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
