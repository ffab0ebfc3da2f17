"""The Ollama `Modelfile` and the README.md beside an exported GGUF.

Ollama does not run the model's Jinja chat template: its TEMPLATE is a Go template, and a wrong one is
the usual reason a model answers differently or never stops in Ollama. No library translates Jinja to
Go templates, so the template is found, not translated: the model's own chat template renders
conversations whose contents are marker strings, and what surrounds each marker is that role's
prefix and suffix (`ChatPieces`). `ChatPieces.render` puts them back together, which tests compare
with the template's own rendering; `go_template` writes the same pieces as Ollama's
`range .Messages` template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from chatlora.errors import ChatloraError

MARK = "\x00chatlora-{}\x00"


@dataclass(frozen=True)
class ChatPieces:
    """What a chat template writes around each message, and after the last one for a reply."""

    prefix: dict[str, str]
    """Text before a message's content, by role (system, user, assistant)."""
    suffix: dict[str, str]
    """Text after a message's content, by role (the assistant's ends with the end-of-turn token)."""
    generation: str
    """What opens the assistant's reply (the generation prompt)."""
    default_system: str | None
    """The system prompt the template writes when a conversation has none (Qwen's "You are a helpful
    assistant."), else None."""

    def render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        text = "".join(self.prefix[m["role"]] + m["content"] + self.suffix[m["role"]] for m in messages)
        return text + (self.generation if generation_prompt else "")


def chat_pieces(render) -> ChatPieces:
    """The pieces of the template behind `render(messages, generation_prompt) -> str` (data/render.py:
    Renderer.text). Raises ChatloraError when the template does not wrap each message's content
    in the same text wherever it stands (then no Ollama template can equal it)."""
    s, u, a, u2 = (MARK.format(n) for n in ("system", "user", "assistant", "user2"))
    convo = [{"role": "system", "content": s}, {"role": "user", "content": u},
             {"role": "assistant", "content": a}, {"role": "user", "content": u2}]
    try:
        full = render(convo, True)
        system_first = full[:full.index(s)]
        head = render(convo[1:], True)  # no system message: the template's default one, if any
        plain = render(convo, False)
        replied = render(convo[:3], False)
    except (ValueError, ChatloraError) as e:
        raise ChatloraError(f"cannot find the chat template's parts for an Ollama TEMPLATE: {e}") from None
    # Between two contents stands one message's suffix and the next one's prefix; a conversation that
    # ends on a message shows that message's suffix alone, which splits the pair.
    between = [full[full.index(x) + len(x):full.index(y)] for x, y in ((s, u), (u, a), (a, u2))]
    user_suffix = plain[plain.index(u2) + len(u2):]
    assistant_suffix = replied[replied.index(a) + len(a):]
    user_prefix = between[2][len(assistant_suffix):]
    assistant_prefix = between[1][len(user_suffix):]
    system_suffix = between[0][:len(between[0]) - len(user_prefix)]
    end = full[full.index(u2) + len(u2):]
    pieces = ChatPieces(prefix={"system": system_first, "user": user_prefix, "assistant": assistant_prefix},
                        suffix={"system": system_suffix, "user": user_suffix, "assistant": assistant_suffix},
                        generation=end[len(user_suffix):], default_system=None)
    before_user = head[:head.index(u)]
    if before_user != user_prefix:  # the template writes a system message of its own
        text = before_user[len(system_first):len(before_user) - len(system_suffix + user_prefix)]
        pieces = ChatPieces(pieces.prefix, pieces.suffix, pieces.generation, text)
    for messages in (convo, convo[1:]):
        wanted = render(messages, True)
        shown = pieces.render(messages if messages[0]["role"] == "system" or pieces.default_system is None
                              else [{"role": "system", "content": pieces.default_system}, *messages])
        if wanted != shown:
            raise ChatloraError("the chat template does not wrap every message the same way (it depends on "
                                "the position or neighbours); no Ollama TEMPLATE can equal it")
    return pieces


def _common_tail(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return a[len(a) - n:]


def _go(text: str) -> str:
    """Literal text inside a Go template (only `{{` needs escaping)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(pieces: ChatPieces) -> str:
    """Ollama's TEMPLATE for these pieces: every message in its role's prefix and suffix, then the
    generation prompt after a last message that is not the assistant's."""
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go(pieces.prefix[role])}'
                       f'{{{{ .Content }}}}{_go(pieces.suffix[role])}'
                       for i, role in enumerate(("system", "user", "assistant")))
    return ('{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
            f'{branches}{{{{ end }}}}{{{{ if and $last (ne .Role "assistant") }}}}{_go(pieces.generation)}'
            '{{ end }}{{ end }}')


def modelfile(gguf_name: str, pieces: ChatPieces, stops: list[str], system: str | None, sampling: dict) -> str:
    """The Modelfile's text: FROM, TEMPLATE, SYSTEM, a PARAMETER stop for each end-of-turn token and
    the sampling defaults."""
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{go_template(pieces)}"""']
    system = system if system is not None else pieces.default_system
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    lines.append("")
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += [f"PARAMETER {k} {v}" for k, v in sampling.items()]
    return "\n".join(lines) + "\n"


def readme(name: str, gguf_name: str, source: str, quant: str, stops: list[str], system: str | None, figures: dict) -> str:
    """README.md for the export folder: what it is, and the commands that run it."""
    check = figures.get("check", {})
    lines = [f"# {name}", "", f"A GGUF ({quant}) of `{source}`, exported by `chatlora export`: the adapter merged "
             "into its base, converted by llama.cpp's converter and quantized by llama.cpp.", ""]
    if check:
        lines += [f"Checked against the merged model in transformers on {check['positions']} held-out positions: "
                  f"top-1 agreement {check['top1_agreement']:.2%}, mean KL {check['mean_kl']:.4g}; greedy replies stop on "
                  f"{', '.join(stops)} wherever transformers' do ({check['replies_stopped']} of {check['replies']}). "
                  "Every figure: `export.json`.", ""]
    lines += ["## Ollama", "", "```", f"ollama create {name} -f Modelfile", f"ollama run {name}", "```", "",
              "## llama.cpp", "", "```",
              f"llama-server -m {gguf_name} --jinja   # OpenAI-compatible API on http://localhost:8080",
              f"llama-cli -m {gguf_name} -cnv --jinja" + (f" -sys {json.dumps(system, ensure_ascii=False)}" if system else ""),
              "```", "", "The chat template and the end-of-turn token travel inside the GGUF "
              "(`tokenizer.chat_template`, `tokenizer.ggml.eos_token_id`)."]
    if system:
        lines += ["", f"It was trained with the system prompt {json.dumps(system, ensure_ascii=False)}: the Modelfile "
                  "sets it; with llama-server, send it as the first (system) message."]
    return "\n".join(lines) + "\n"
