"""Every command's flags and --help text: the argparse parser of `chatlora`. What each command then
runs is cli.py's table."""

from __future__ import annotations

import argparse
import os

from chatlora import __version__

CONFIG_HELP = """\
CONFIG is a preset name ({presets}) or a YAML file; key=value pairs override it with dotted keys:
  chatlora train demo training.learning_rate=2e-4 lora.r=16
  chatlora train qwen1.5-7b-chat-huanhuan data.train=huanhuan.json
`chatlora config keys` lists every key with its meaning.
"""

EPILOG = CONFIG_HELP + """
exit codes: 0 ok; 2 bad input (config, data, model path; nothing is written); 3 training stopped on a
NaN/inf loss or gradient; 74 a file could not be written (disk full, permissions); 75 stopped by SIGTERM
or a first Ctrl-C after saving a checkpoint (continue with resume=auto); 130 interrupted at once (a
second Ctrl-C). In every case the complete checkpoints are kept.
"""

# plan and data check train nothing: none of training's own exit codes (3, 74, 75) can come from them.
CHECK_EPILOG = CONFIG_HELP + """
exit codes: 0 ok; 2 bad input (config, data, model path){also}; 130 interrupted.
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="demo", help="preset name or YAML file (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. training.num_train_epochs=1")


USE_EPILOG = """\
RUN is a run folder written by `chatlora train` (or its adapter/ folder, or any peft adapter folder
with --model naming its base model).

exit codes: 0 ok, 2 bad input (run folder, data, flags; nothing is written), 130 interrupted.
"""


def _positive(text: str) -> int:
    """argparse type: an int of at least 1 (argparse then reports a bad value with exit code 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _port(lowest: int):
    """argparse type: a TCP port number from `lowest` to 65535 (the socket calls would wrap a larger
    one around or overflow, after the model has loaded)."""

    def port(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(f"{value} is not a port number: give {lowest} to 65535")
        return value

    return port


def _device(text: str) -> str:
    """argparse type: a device this machine has, checked before any model loads."""
    from chatlora.model.decode_modes import device_problem

    why = device_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} must be between 0 and 1")
    return value


def _target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder (or adapter folder)")
    p.add_argument("--model", metavar="BASE", help="load the base model from here instead (a local copy, a .gguf file, a hub id)")
    p.add_argument("--device", type=_device, help="cpu, cuda, cuda:1 ... (default: cuda when present)")


def _chat_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "chat", formatter_class=fmt, help="talk to the adapter: terminal chat, one prompt, or a file of prompts",
        description="""\
Chat with a trained adapter in the terminal: replies stream as they are written, the
conversation is remembered, and /reset, /system, /history, /help, /quit work inside.
--prompt answers one prompt; --prompts-file answers a file of them as JSONL.
--base shows the base model's reply next to the adapter's.""",
        epilog=USE_EPILOG + """
--output is checked before any reply is generated; one that still cannot be written at the end (a full
disk) gets the replies on stdout instead, and exit code 74.

examples:
  chatlora chat runs/demo-20261127-101500
  chatlora chat runs/demo-20261127-101500 --prompt "Who are you?" --temperature 0
  chatlora chat runs/demo-20261127-101500 --base --prompts-file questions.txt --output replies.jsonl
""")
    _target_args(p)
    p.add_argument("--base", action="store_true", help="answer with the base model too, side by side (the adapter is then not merged)")
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line, or JSONL rows with \"prompt\" or \"messages\"; replies are written as JSONL")
    p.add_argument("--output", metavar="FILE", help="with --prompts-file: write the JSONL here (default: stdout)")
    p.add_argument("--batch-size", type=_positive, default=8, help="prompts generated together with --prompts-file (default 8)")
    p.add_argument("--system", metavar="TEXT", help="system prompt (default: the one the run was trained with; 'none' for none)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=_positive, default=512, help="longest reply in tokens (default 512)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9; 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages repeating tokens (default 1.0 = off)")
    g.add_argument("--seed", type=int, help="make sampled replies repeatable")
    _decode_arg(p)


def _decode_arg(p: argparse.ArgumentParser) -> None:
    from chatlora.model.decode_modes import MODE_HELP, MODES

    p.add_argument("--decode", choices=MODES, default="auto", help=MODE_HELP + " (default auto)")


def _eval_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "eval", formatter_class=fmt, help="held-out loss and greedy replies: base model vs. adapter",
        description="""\
Judge an adapter on held-out data, next to its base model: loss and perplexity on the
trained tokens, then greedy replies with their stop rate (ended on the end-of-turn token
before the limit), mean length, repetition (repeated token 4-grams) and character-level
ROUGE-L against the reference reply. Writes RUN/eval/NAME.json and NAME.md, where NAME is
the --data file's name without its extension (more_held_out for more_held_out.jsonl), or
`validation` for the run's own held-out split; --out DIR writes them there instead.""",
        epilog=USE_EPILOG + """
examples:
  chatlora eval runs/demo-20261127-101500
  chatlora eval runs/demo-20261127-101500 --data more_held_out.jsonl --max-new-tokens 256
""")
    _target_args(p)
    p.add_argument("--data", metavar="FILE", help="held-out data (any training format; default: the run's validation split)")
    p.add_argument("--max-new-tokens", type=_positive, default=128, help="token limit of each reply (default 128)")
    p.add_argument("--limit", type=_positive, help="evaluate only the first N conversations")
    p.add_argument("--batch-size", type=_positive, default=8, help="conversations per forward pass (default 8)")
    p.add_argument("--out", metavar="DIR", help="where the report goes (default: RUN/eval/)")


def _merge_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "merge", formatter_class=fmt, help="a standalone merged model, checked against base + adapter",
        description="""\
Merge the adapter into the base weights and save a standalone model to OUT: safetensors,
the tokenizer with its chat template, and a generation config that stops on the
end-of-turn token. The saved model is reloaded and its logits compared with base +
adapter on held-out conversations; outside the tolerance nothing is written.
An adapter with NaN or inf weights is refused.""",
        epilog=USE_EPILOG + """
tolerance (max |logit difference|, min top-1 agreement) by saved dtype:
  float32 1e-2, 99%;  float16 0.5, 95%;  bfloat16 1.0, 95%

examples:
  chatlora merge runs/demo-20261127-101500 merged/pirate-135m
  chatlora merge runs/qwen-huanhuan merged/huanhuan --dtype bfloat16
""")
    _target_args(p)
    p.add_argument("out", metavar="OUT", help="output folder (must not exist, or be empty)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default: the dtype the base model loads in)")
    p.add_argument("--data", metavar="FILE", help="conversations for the parity check (default: the run's held-out rows, else its last training rows)")
    p.add_argument("--prompts", type=_positive, default=8, help="conversations in the parity check (default 8)")
    p.add_argument("--max-diff", type=float, help="largest |logit difference| allowed (default by dtype, see below)")
    p.add_argument("--min-top1", type=_fraction, help="least top-1 agreement allowed, 0-1 (default by dtype)")


def _train_parser(sub, fmt, epilog: str) -> None:
    """`chatlora train CONFIG`."""
    p = sub.add_parser("train", formatter_class=fmt, epilog=epilog, help="train a LoRA adapter: data -> run folder",
                       description="""\
Check and tokenize the data, then train a LoRA adapter into a new run folder:
runs/<name>-<date>-<time> under the current folder (<name> is the config's `name`,
e.g. runs/demo-20261127-101500), or the folder output_dir=FOLDER names. It holds
the adapter, the tokenizer, the resolved config and the metrics, for chat, eval,
merge, serve and web.
On several GPUs: --gpus N, or launch this same command with torchrun or
`accelerate launch` (several nodes: docs/multi-gpu.md).""")
    _config_args(p)
    p.add_argument("--gpus", type=_positive, metavar="N",
                   help="train on N GPUs of this machine: N processes started through torchrun, the same samples per "
                        "optimizer step as on one (without GPUs: N CPU processes)")


def _plan_parser(sub, fmt, presets: str) -> None:
    """`chatlora plan CONFIG`."""
    p = sub.add_parser(
        "plan", formatter_class=fmt, help="predicted peak GPU memory and tokens/s of a config, before training",
        description="""\
Predict what training this config needs on a GPU, without loading any weight: peak memory
by part (weights, LoRA weights + gradients + AdamW state, activations kept for backward
with or without gradient checkpointing, the output layer's logits chunk) and tokens/s.
The data is tokenized as training would (and cached) to replay the run's batches; the
architecture comes from the model's config.json. The GPU is the one detected, or --gpu /
--gpu-mem. With data.batch_tokens=auto and/or training.gradient_checkpointing=auto it shows
what training would choose. `chatlora train` prints the same plan first.

Memory is what torch.cuda.max_memory_allocated() reports; the card needs more (the CUDA
context, the allocator's slack), shown as 'the card needs'.""",
        epilog=CHECK_EPILOG.format(presets=presets, also="") + """
examples:
  chatlora plan qwen1.5-7b-chat-huanhuan data.train=huanhuan.json --gpu-mem 24GiB
  chatlora plan qwen1.5-7b-chat-huanhuan data.train=huanhuan.json --gpu 4090 model.quantize=nf4
  chatlora plan qwen1.5-7b-chat-huanhuan data.train=huanhuan.json --gpu h100 data.batch_tokens=auto training.gradient_checkpointing=auto
""")
    _config_args(p)
    p.add_argument("--gpu", metavar="NAME", help="plan for this GPU (h100, h200, a100, l40s, 4090, ...; default: the one detected)")
    p.add_argument("--gpu-mem", metavar="SIZE", help="plan for this much GPU memory (24GiB, 24GB, or GiB as a number)")


def _group(sub, fmt, name: str, help: str, description: str, epilog: str):
    """A command with commands of its own (`data check`, `config show`): their subparsers."""
    group = sub.add_parser(name, formatter_class=fmt, help=help, description=description, epilog=epilog)
    return group.add_subparsers(dest=f"{name}_command", metavar=f"{name.upper()}_COMMAND", required=True)


def _data_parser(sub, fmt, presets: str) -> None:
    """`chatlora data check CONFIG`."""
    data_sub = _group(sub, fmt, "data", "data tools (check)",
                      "Data tools. `data check` runs the checks `chatlora train` makes on the data first,\n"
                      "alone, with no model weights loaded.",
                      "example:\n  chatlora data check demo\n")
    p = data_sub.add_parser("check", formatter_class=fmt, help="the pre-flight alone, no model weights loaded",
                            description="""\
Validate every row, render samples with the chat template (trained tokens marked),
show a length histogram, and fail on data that would train the model wrongly.""",
                            epilog=CHECK_EPILOG.format(presets=presets, also=" or data that would train the model wrongly") + """
examples:
  chatlora data check demo
  chatlora data check qwen1.5-7b-chat-huanhuan data.train=huanhuan.json --samples 5
""")
    _config_args(p)
    p.add_argument("--samples", type=int, default=3, help="rendered samples to show (default 3)")


def _runs_args(p: argparse.ArgumentParser, host_help: str, port_type, port: int, port_help: str) -> None:
    """The run folders and the address of serve and web."""
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders trained on the same base model")
    p.add_argument("--host", default="127.0.0.1", help=host_help)
    p.add_argument("--port", type=port_type, default=port, help=port_help)


def _engine_args(p: argparse.ArgumentParser) -> None:
    """The device and decode mode of serve's and web's engine."""
    p.add_argument("--device", type=_device, help="cuda, cpu, ... (default: cuda when available)")
    _decode_arg(p)


def _serve_parser(sub, fmt) -> None:
    """`chatlora serve RUN...`."""
    p = sub.add_parser(
        "serve", formatter_class=fmt, help="OpenAI-compatible HTTP API for one or more runs",
        description="""\
Serve the runs' adapters on their shared base model through an OpenAI-compatible HTTP API;
any OpenAI client works. Each run folder's name is a model name; the base model is one too.
Once the model is loaded it prints the address it serves at (serving the OpenAI API at
http://127.0.0.1:8000/v1); with --port 0 that line tells the free port it picked.

endpoints (behind the API key, when there is one):
  GET  /v1/models            the served model names
  GET  /v1/models/NAME       one of them
  POST /v1/chat/completions  a reply, whole or streamed ("stream": true: server-sent events)
  GET  /health               the engine's counters: requests, tokens, batches""",
        epilog="""\
RUN is a run folder written by `chatlora train`.

SIGTERM or Ctrl-C stops it: new requests get 503, running ones get --drain-seconds to finish, then
end with an error (a stream: an error chunk and [DONE]). A second Ctrl-C ends them at once.

exit codes: 0 stopped by SIGTERM or Ctrl-C; 130 a second Ctrl-C cut the drain short; 2 bad input (run
folder, flags, an address that cannot be used).

examples:
  chatlora serve runs/demo-20261127-101500
  chatlora serve runs/demo-20261127-101500 runs/poet-20261127-113000 --port 0
  chatlora serve runs/demo-20261127-101500 --host 0.0.0.0 --api-key "$(openssl rand -hex 16)"
""")
    _runs_args(p, "address to listen on (default 127.0.0.1; any other needs an API key)", _port(0), 8000,
               "port (default 8000; 0 picks a free one and prints it)")
    p.add_argument("--api-key", default=os.environ.get("CHATLORA_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY' (default: $CHATLORA_API_KEY)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens one request may ask for (default 1024)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests generated together (default 32)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (default 1 MiB)")
    p.add_argument("--max-context", type=int, default=4096,
                   help="with the static decode cache: most tokens of one request, prompt and reply together; "
                        "lowered to what fits in half the free GPU memory (default 4096)")
    p.add_argument("--drain-seconds", type=float, default=20.0,
                   help="on SIGTERM or Ctrl-C: how long running requests get to finish (default 20)")
    _engine_args(p)


def _web_parser(sub, fmt) -> None:
    """`chatlora web RUN...`."""
    p = sub.add_parser(
        "web", formatter_class=fmt, help="the browser chat page (Streamlit)",
        description="""\
A chat page for the runs in the browser: streaming replies, a choice of model (each run's
adapter, or the base model), system prompt, temperature, clear history. It needs Streamlit:
pip install 'chatlora[web]'. Once the model is loaded it prints the page's address: open
http://127.0.0.1:8501 (or the --port given). The page has no login, so it listens on
loopback only; from another machine, use an SSH tunnel (ssh -L 8501:127.0.0.1:8501 HOST).""",
        epilog="""\
RUN is a run folder written by `chatlora train`.

exit codes: 0 or 130 stopped with Ctrl-C; 2 bad input (run folder, flags, a port in use, no Streamlit).

examples:
  chatlora web runs/demo-20261127-101500
  chatlora web runs/demo-20261127-101500 runs/poet-20261127-113000 --port 8600
""")
    _runs_args(p, "loopback address to listen on (default 127.0.0.1)", _port(1), 8501, "port (default 8501)")
    p.add_argument("--max-tokens", type=int, default=1024, help="most new tokens of one reply (default 1024)")
    _engine_args(p)


def _config_parser(sub, fmt, presets: str) -> None:
    """`chatlora config presets | keys | show`."""
    cfg_sub = _group(sub, fmt, "config", "show presets, a resolved config, or every config key",
                     "Look at configs without training: the shipped presets, every key with its default\n"
                     "and meaning, or a config resolved with its overrides.",
                     "examples:\n  chatlora config presets\n  chatlora config keys\n  chatlora config show demo lora.r=16\n")
    cfg_sub.add_parser("presets", formatter_class=fmt, help="list the shipped presets",
                       description="""\
List the shipped presets, one name a line: each is a CONFIG for train, plan, data check
and config show.""",
                       epilog="example:\n  chatlora config presets\n  chatlora config show qwen1.5-7b-chat-huanhuan\n")
    cfg_sub.add_parser("keys", formatter_class=fmt, help="every config key with its default and meaning",
                       description="""\
Every config key, dotted as overrides spell it, with its default and what it means.
Everything under training: goes to transformers.TrainingArguments.""",
                       epilog="examples:\n  chatlora config keys\n  chatlora config keys | grep -A3 '^lora\\.'\n")
    p = cfg_sub.add_parser("show", formatter_class=fmt, help="print a resolved config as YAML",
                           description="""\
Print CONFIG with its overrides applied and every default filled in, as YAML: what
`chatlora train` would run with. Saved to a file, it is a config of your own to edit.""",
                           epilog=CONFIG_HELP.format(presets=presets) + """
examples:
  chatlora config show demo lora.r=16
  chatlora config show qwen1.5-7b-chat-huanhuan > my.yaml
""")
    _config_args(p)


def parser() -> argparse.ArgumentParser:
    from chatlora.config.load import preset_names

    presets = ", ".join(preset_names())
    epilog = EPILOG.format(presets=presets)
    fmt = argparse.RawDescriptionHelpFormatter
    root = argparse.ArgumentParser(
        prog="chatlora", formatter_class=fmt, epilog=epilog,
        description="Turn an open chat model into your own assistant with LoRA.")
    root.add_argument("--version", action="version", version=f"chatlora {__version__}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND")

    _train_parser(sub, fmt, epilog)
    _plan_parser(sub, fmt, presets)
    _data_parser(sub, fmt, presets)
    _chat_parser(sub, fmt)
    _eval_parser(sub, fmt)
    _merge_parser(sub, fmt)
    from chatlora.flags_export import export_parser

    export_parser(sub, fmt, _positive, _fraction, _device, USE_EPILOG)
    _serve_parser(sub, fmt)
    _web_parser(sub, fmt)
    _config_parser(sub, fmt, presets)
    return root
