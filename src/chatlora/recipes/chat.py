"""`chatlora chat`: talk to a trained adapter in the terminal, answer one prompt, or a file of prompts.

Loading: a single adapter is merged into the base weights in memory (one matmul per layer instead
of three, so replies come faster), and on CUDA replies are decoded from recorded CUDA graphs over a
static KV cache (chatlora.generate.decode; `--decode eager` turns that off). `--base` needs the base
model too, so then the adapter stays unmerged and the base model's replies are generated with it
switched off: merging and unmerging in bf16 would not give back the base weights exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from chatlora.data.formats import not_text
from chatlora.data.read import jsonl_lines
from chatlora.errors import ConfigError, DataError, Problem, StorageError
from chatlora.model.from_run import Loaded, default_device, load_target
from chatlora.generate.replies import Reply, generate_replies, stream_reply
from chatlora.generate.sampling import SEED_MAX, SEED_MIN, Sampling
from chatlora.run import write_atomic

HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system         show the system prompt
  /system TEXT    set the system prompt (/system none: no system prompt)
  /history        show the conversation so far
  /help           this list
  /quit           leave (Ctrl-D works too; Ctrl-C stops a reply that is being written)"""


CHAT_SAMPLING = Sampling(max_new_tokens=512, temperature=0.7, top_p=0.9)
"""The chat command's defaults (its flags' defaults too)."""


def check_sampling(sampling: Sampling) -> None:
    """Refuse options the chat command's flags cannot mean, with a ConfigError naming the flag."""
    # First: NaN passes every comparison below (nan < 0 is False) and reaches transformers' own checks.
    for flag, value in (("temperature", sampling.temperature), ("top-p", sampling.top_p),
                        ("repetition-penalty", sampling.repetition_penalty)):
        if not math.isfinite(value):
            raise ConfigError(f"--{flag}: {value} is not a finite number")
    if sampling.max_new_tokens is None or sampling.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: {sampling.max_new_tokens} must be at least 1")
    if sampling.temperature < 0:
        raise ConfigError(f"--temperature: {sampling.temperature} must be 0 (greedy) or more")
    if not 0 < sampling.top_p <= 1:
        raise ConfigError(f"--top-p: {sampling.top_p} must be in (0, 1]")
    if sampling.top_k < 0:
        raise ConfigError(f"--top-k: {sampling.top_k} must be 0 (off) or more")
    if sampling.repetition_penalty <= 0:
        raise ConfigError(f"--repetition-penalty: {sampling.repetition_penalty} must be positive (1.0 = off)")
    if sampling.seed is not None and not SEED_MIN <= sampling.seed <= SEED_MAX:
        raise ConfigError(f"--seed: {sampling.seed} must fit in 64 bits (-2**63 to 2**63-1)")


def load_for_chat(target: str, base_model: str | None = None, compare: bool = False, device: str | None = None,
                  decode: str = "auto", echo: Callable[[str], None] = lambda line: None) -> Loaded:
    """The run's model ready to chat: adapter merged in memory, or kept switchable for `compare`;
    with the fast decode path of `decode` (see chatlora.model.decode_modes.MODES) recorded and checked."""
    from chatlora.generate.decode import fast_decoder
    from chatlora.model.decode_modes import resolve_mode

    resolve_mode(decode, device or default_device())  # a mode this device cannot run fails before loading
    loaded = load_target(target, base_model, device)
    if not compare and len(loaded.adapters) == 1:
        loaded.model = loaded.model.merge_and_unload()
        loaded.model.eval()
    loaded.decoder = fast_decoder(loaded.model, decode, slots=1, echo=echo)
    return loaded


def printable(text: str) -> str:
    """The text with control characters (a model can emit any byte, ESC included) shown as U+FFFD,
    so a reply cannot move the cursor, clear the screen or retitle the terminal."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else "\ufffd" for c in text)


class ChatSession:
    """Multi-turn history and the system prompt; with `compare`, the base model answers too, each
    side with its own history (a side sees only its own earlier replies)."""

    def __init__(self, loaded: Loaded, sampling: Sampling, system_prompt: str | None, compare: bool = False):
        self.loaded, self.sampling, self.system_prompt = loaded, sampling, system_prompt
        self.sides = ["base", "adapter"] if compare else ["assistant"]
        self.history: dict[str, list[dict]] = {side: [] for side in self.sides}

    def reset(self) -> None:
        self.history = {side: [] for side in self.sides}

    def messages(self, side: str) -> list[dict]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.history[side]

    def ask(self, text: str, write: Callable[[str], None], stats: Callable[[str], None] | None = None) -> dict[str, Reply]:
        """Stream each side's reply to `text` through `write` (labelled when there are two sides),
        add the turn to the history, and send a line of numbers per reply to `stats`.

        Ctrl-C stops the reply being written; the interrupted turn is left out of the history and
        KeyboardInterrupt is raised again for the caller.
        """
        replies: dict[str, Reply] = {}
        for side in self.sides:
            messages = self.messages(side) + [{"role": "user", "content": text}]
            if len(self.sides) > 1:
                write(f"{side}> ")
            started = time.perf_counter()
            # The base model's replies: the same peft model with its adapter switched off.
            decoder = self.loaded.decoder
            if decoder is not None:
                decoder.variant = "base" if side == "base" else "default"  # each has its own recorded graphs
            with self.loaded.model.disable_adapter() if side == "base" else contextlib.nullcontext():
                stream = stream_reply(self.loaded.model, self.loaded.renderer, messages, self.sampling, decoder=decoder)
                try:
                    for piece in stream:
                        write(printable(piece))
                except KeyboardInterrupt:
                    stream.close()
                    write(" [interrupted]\n")
                    raise
            write("\n")
            reply = replies[side] = stream.reply
            if stats is not None:
                seconds = time.perf_counter() - started
                limit = "" if reply.stopped else f", hit the {self.sampling.max_new_tokens}-token limit"
                stats(f"[{len(reply.ids)} tokens, {seconds:.1f} s, {len(reply.ids) / max(seconds, 1e-9):.1f} tok/s, "
                      f"context {stream.prompt_tokens + reply.tokens} tokens{limit}]")
        # Only once every side has answered, so an interrupted turn is in no side's history.
        for side, reply in replies.items():
            self.history[side] += [{"role": "user", "content": text}, {"role": "assistant", "content": reply.text}]
        return replies


def interactive(session: ChatSession, name: str, merged: bool, out: TextIO = sys.stdout) -> None:
    """The terminal chat loop: read a line, run a command or stream the reply, until /quit or EOF."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and ↑ history for input())

    write = lambda s: (out.write(s), out.flush())  # noqa: E731  (flush: each piece shows as it comes)
    color = out.isatty() and os.environ.get("TERM") != "dumb" and "NO_COLOR" not in os.environ
    dim = (lambda s: write(f"\033[2m{s}\033[0m\n")) if color else (lambda s: write(s + "\n"))
    how = "adapter merged into the base weights" if merged else "adapter switchable, base model answers first"
    write(f"chatting with {name} ({how})\n")
    write(f"system prompt: {session.system_prompt or '(none: the chat template default)'}\n")
    write("type /help for commands, /quit to leave\n")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if not command(session, line.strip(), write):
                return
            continue
        try:
            session.ask(line, write, dim)
        except KeyboardInterrupt:
            continue


def command(session: ChatSession, line: str, write: Callable[[str], None]) -> bool:
    """Run one /command; False means leave the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return False
    if name == "/reset":
        session.reset()
        write("history cleared\n")
    elif name == "/system":
        if arg:
            session.system_prompt = None if arg == "none" else arg
            write(f"system prompt set: {session.system_prompt or '(none)'}\n")
        else:
            write(f"system prompt: {session.system_prompt or '(none: the chat template default)'}\n")
    elif name == "/history":
        turns = session.history[session.sides[-1]]
        if not turns:
            write("(no history)\n")
        for m in turns:
            write(f"{m['role']}: {printable(m['content'])}\n")
    elif name == "/help":
        write(HELP + "\n")
    else:
        write(f"unknown command {name}; /help lists the commands\n")
    return True


def read_prompts(path: str) -> list[list[dict]]:
    """A prompts file: one prompt per line, or JSONL rows with `prompt` (a string) or `messages`
    (OpenAI messages ending with a user turn). Raises DataError listing every bad line."""
    file = Path(path)
    if not file.is_file():
        raise DataError([Problem(path, "", "", "no such file")])
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError([Problem(path, "", "", f"not UTF-8 ({e.reason} at byte {e.start})")]) from None
    lines = jsonl_lines(text)  # `chat --output` writes U+2028 and the like raw inside its JSON strings
    first = next((line for line in lines if line.strip()), "")
    is_jsonl = file.suffix == ".jsonl" or first.lstrip().startswith("{")
    prompts, problems = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not is_jsonl:
            prompts.append([{"role": "user", "content": line}])
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(path, where, "", f"malformed JSON at column {e.colno}: {e.msg}"))
            continue
        except RecursionError:  # json recurses once per level of [ or {
            problems.append(Problem(path, where, "", "JSON nested too deeply to be a prompt (hundreds of levels of [ or {)"))
            continue
        except ValueError as e:  # an integer of more digits than Python converts (4300)
            problems.append(Problem(path, where, "", f"malformed JSON: {e}"))
            continue
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
            conversation, fields = [{"role": "user", "content": row["prompt"]}], ["prompt"]
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            messages = row["messages"]
            bad = next((i for i, m in enumerate(messages) if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                                                                  and m.get("role") in ("system", "user", "assistant"))), None)
            if bad is not None:
                problems.append(Problem(path, where, f"messages[{bad}]", "needs a role (system, user, assistant) and a string content"))
                continue
            if messages[-1]["role"] != "user":
                problems.append(Problem(path, where, f"messages[{len(messages) - 1}].role", "the last message must be the user's"))
                continue
            conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
            fields = [f"messages[{i}].content" for i in range(len(messages))]
        else:
            problems.append(Problem(path, where, "", 'needs "prompt" (a non-empty string) or "messages" (a list)'))
            continue
        broken = next(((f, why) for f, m in zip(fields, conversation) if (why := not_text(m["content"]))), None)
        if broken:
            problems.append(Problem(path, where, *broken))
        else:
            prompts.append(conversation)
    if problems:
        raise DataError(problems)
    if not prompts:
        raise DataError([Problem(path, "", "", "no prompts")])
    return prompts


def check_output(output: str, prompts_file: str) -> None:
    """Refuse an --output the replies could not be written to, before any reply is generated (they
    are written at the end, all at once), and one that is the prompts file itself."""
    out = Path(output)
    if out.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a file name for the JSONL replies")
    if out.exists() and out.samefile(prompts_file):
        raise ConfigError(f"--output {output} is the prompts file: writing the replies would overwrite the prompts; "
                          "give another file")
    parent = out.parent
    if not parent.exists():
        raise ConfigError(f"--output {output}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise ConfigError(f"--output {output}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: the folder {parent} is not writable")


def answer_file(loaded: Loaded, prompts_file: str, output: str | None, sampling: Sampling, system_prompt: str | None,
                compare: bool, batch_size: int = 8, err: TextIO = sys.stderr) -> int:
    """Replies to every prompt of a file, batched, as JSONL to `output` (written whole, then renamed)
    or to stdout. Returns the number of prompts."""
    from tqdm.auto import tqdm

    prompts = read_prompts(prompts_file)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    conversations = [p if p[0]["role"] == "system" else system + p for p in prompts]
    sides = {}
    for side in (["base", "adapter"] if compare else ["adapter"]):
        with loaded.model.disable_adapter() if side == "base" else contextlib.nullcontext():
            with tqdm(total=len(prompts), desc=f"replies ({side})" if compare else "replies", unit="prompt", file=err) as bar:
                sides[side] = generate_replies(loaded.model, loaded.renderer, conversations, sampling, batch_size,
                                               progress=bar)
    rows = []
    for i, prompt in enumerate(prompts):
        single = len(prompt) == 1
        row: dict = {"prompt": prompt[0]["content"]} if single else {"messages": prompt}
        reply = sides["adapter"][i]
        row.update(reply=reply.text, stopped=reply.stopped, tokens=len(reply.ids))
        if compare:
            b = sides["base"][i]
            row["base"] = {"reply": b.text, "stopped": b.stopped, "tokens": len(b.ids)}
        rows.append(json.dumps(row, ensure_ascii=False))
    text = "\n".join(rows) + "\n"
    if output:
        try:
            write_atomic(Path(output), text)
        except OSError as e:  # checked before generating, but a disk can still fill up: keep the replies
            sys.stdout.write(text)
            raise StorageError(f"--output {output} could not be written ({e.strerror or e}); "
                               "the replies were written to stdout instead") from None
        err.write(f"wrote {len(rows)} replies to {output}\n")
    else:
        sys.stdout.write(text)
    return len(rows)


def chat(target: str, *, model: str | None = None, base: bool = False, prompt: str | None = None,
         prompts_file: str | None = None, output: str | None = None, system: str | None = None,
         sampling: Sampling | None = None, batch_size: int = 8, device: str | None = None, decode: str = "auto") -> None:
    """`chatlora chat`: the terminal chat, or one reply (`prompt`), or a file of prompts (`prompts_file`).

    `system` None keeps the run's own system prompt; "none" (or "") means none at all.
    Raises ChatloraError for a bad target, bad flags or a bad prompts file.
    """
    sampling = sampling or CHAT_SAMPLING
    check_sampling(sampling)
    if prompt is not None and prompts_file is not None:
        raise ConfigError("give --prompt or --prompts-file, not both")
    if output and not prompts_file:
        raise ConfigError("--output goes with --prompts-file")
    for flag, text in (("--prompt", prompt), ("--system", system)):
        # Bytes that are not UTF-8 in the command line arrive as lone surrogates, which no tokenizer takes.
        if text is not None and not_text(text):
            raise ConfigError(f"{flag}: not UTF-8 text (the shell passed bytes in another encoding)")
    if prompts_file:
        read_prompts(prompts_file)  # a bad file fails before the model loads
    if output:
        check_output(output, prompts_file)
    err = sys.stderr
    err.write(f"loading {target} ...\n")
    # Only conversations use the fast path; a prompts file is answered in batches by `generate`.
    loaded = load_for_chat(target, model, compare=base, device=device, decode="eager" if prompts_file else decode,
                           echo=lambda line: err.write(line + "\n"))
    if system is None:
        system = loaded.system_prompt
    elif system.strip() in ("", "none"):
        system = None
    if prompts_file:
        answer_file(loaded, prompts_file, output, sampling, system, base, batch_size, err)
        return
    session = ChatSession(loaded, sampling, system, compare=base)
    if prompt is not None:
        replies = session.ask(prompt, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        for side, reply in replies.items():
            if not reply.stopped:
                name = "the reply" if side == "assistant" else f"the {side} reply"
                err.write(f"warning: {name} hit the {sampling.max_new_tokens}-token limit before the end-of-turn token\n")
        return
    name = loaded.run.path.name if loaded.run else Path(target).name
    interactive(session, name, merged=not base)
