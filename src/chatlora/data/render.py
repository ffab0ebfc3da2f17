"""Render conversations with the tokenizer's own chat template and mark the trained tokens.

Each assistant turn is trained on the prompt inference would build for it: the conversation up to the
turn rendered with the generation prompt, then the reply as the template writes it when the turn is
the last message, through the first token generation stops on. The reply is found by rendering the
turn once with a sentinel in place of its text, so no marker strings of any template are needed.

How the trained turns of one conversation become samples (`Renderer.strategy` says which applies):
- prefix: each turn's sample is a prefix of the next one's (ChatML, Llama 3, Gemma, Phi): one sample
  per conversation, every turn trained in it.
- per-turn: the template renders earlier turns differently once later turns follow (Qwen3 drops old
  reasoning, Mistral-Nemo moves the system prompt to the last user turn): the turns that still share
  a prefix share a sample, the others get samples of their own, each exactly what inference sees.
- generation-markers: the template marks replies with `{% generation %}` (transformers' assistant
  masks): those tokens are trained, through the next stop token.
Hand-written because transformers only offers the third (and only for templates that have markers),
and TRL's completion masks assume a prefix-consistent template.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from chatlora.errors import ChatloraError

IGNORE = -100

# End-of-turn tokens of common chat templates. Together with the tokenizer's eos token and the
# generation config's stop tokens they tell where a reply ends inside the rendered turn.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|eot|>")

# Sentinels stand in for a reply's text (and its reasoning) to find where the template writes them.
# Letters only: templates trim, split on `</think>` and escape, and must leave these untouched.
REPLY, THOUGHT, NEXT = "QxReplySentinelChatlora", "QxThoughtSentinelChatlora", "QxNextSentinelChatlora"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# What a reasoning model writes between its thoughts and its reply (Qwen3 and DeepSeek-R1 alike).
THOUGHT_END = "\n" + THINK_CLOSE + "\n\n"
_OPEN_THINK_AT_END = re.compile(r"<think>\s*$")
NO_END = "ends a reply with no end-of-turn token that generation stops on"
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RenderError(ChatloraError, ValueError):
    """A conversation the template cannot render, or whose replies cannot be found in the rendering."""


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    """IGNORE (-100) where not trained, else the token id."""

    @property
    def trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)

    def __len__(self) -> int:
        return len(self.input_ids)


def split_reasoning(message: dict) -> tuple[str | None, str]:
    """(reasoning, reply) of an assistant message: `reasoning_content` (OpenAI's field), or a leading
    `<think>...</think>` block of the content, as reasoning models write them."""
    content = message["content"]
    if message.get("reasoning_content"):
        return message["reasoning_content"], content
    head = content.lstrip()
    if head.startswith(THINK_OPEN) and THINK_CLOSE in head:
        thought, _, reply = head[len(THINK_OPEN):].partition(THINK_CLOSE)
        return thought.strip("\n") or None, reply.lstrip("\n")
    return None, content


class Renderer:
    """Turns conversations into input ids and labels with one tokenizer's template.

    `train_on`: all assistant turns, or the last. `reasoning`: keep (train a reply's reasoning where the
    template renders it for the turn) or drop (train the reply alone).
    """

    def __init__(self, tokenizer, stop_ids: set[int], train_on: str = "all", reasoning: str = "keep"):
        if not getattr(tokenizer, "chat_template", None):
            raise RenderError("the tokenizer has no chat template; use a chat model or a tokenizer folder with one")
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.reasoning = reasoning
        self.end_ids = set(stop_ids)
        if tokenizer.eos_token_id is not None:
            self.end_ids.add(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        self.end_ids |= {vocab[t] for t in KNOWN_END_OF_TURN if t in vocab}
        self.markers = bool(_MARKERS.search(str(tokenizer.chat_template)))
        # The text after a reply is the template's own (`<|im_end|>\n`), the same for nearly every row.
        self._through_stop = functools.lru_cache(maxsize=256)(self._find_through_stop)
        self.fold_system = self._folds_system()

    def __getstate__(self) -> dict:  # data.num_proc's workers get a copy; the cache is rebuilt there
        return {k: v for k, v in self.__dict__.items() if k != "_through_stop"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._through_stop = functools.lru_cache(maxsize=256)(self._find_through_stop)

    # -- what the template does, probed once -------------------------------------------------------

    def _folds_system(self) -> bool:
        """True when the template has no system role (it refuses one, or drops its text): the system
        prompt then goes in front of the first user turn, as Gemma 3's own template does."""
        probe = [{"role": "system", "content": THOUGHT}, {"role": "user", "content": "Hi"}]
        try:
            if THOUGHT in self._render(probe, True):  # as inference renders it
                return False
        except RenderError:
            pass
        try:
            self._render(_fold(probe), True)
        except RenderError:
            return False  # it fails without a system message too: the first real render says why
        return True

    @property
    def strategy(self) -> str:
        """How replies are found, for the data report: generation-markers, prefix or per-turn."""
        if self.markers:
            return "generation-markers"
        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                 {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]
        try:
            return "prefix" if len(Renderer(self.tokenizer, self.end_ids, "all").split(probe)) == 1 else "per-turn"
        except RenderError:
            return "per-turn"

    def notes(self) -> list[str]:
        """What the data report should say about this template."""
        out = [f"masking: {self.strategy} ({STRATEGY_WHY[self.strategy]})"]
        if self.fold_system:
            out.append("system prompts: the template has no system role; they are written before the first user message")
        return out

    def end_of_turn(self, strict: bool = False) -> int | None:
        """The token that ends an assistant turn in this template (ChatML: `<|im_end|>`), or None when
        the template ends replies with no token generation stops on (with `strict`, RenderError saying
        how to fix it)."""
        try:
            probe = self.tokenize([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
        except RenderError as e:
            if NO_END in str(e) and not strict:
                return None
            raise
        return probe.labels[-1] if probe.labels[-1] in self.end_ids else None

    # -- rendering ---------------------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as e:
            raise RenderError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def text(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """The rendered conversation. Raises RenderError when the template fails or refuses it (many
        templates `raise_exception` on roles they do not support)."""
        return self._render(_fold(messages) if self.fold_system else messages, generation_prompt)

    def encode(self, text: str) -> list[int]:
        # The rendered text carries the template's own special tokens (BOS included), as transformers
        # does in apply_chat_template(tokenize=True).
        return self.encode_many([text])[0]

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, as `tokenizer(text, add_special_tokens=False)` gives them. A fast
        tokenizer whose encoding transformers does not customize is asked directly: transformers'
        per-call work cost as much as the encoding itself (bench/LOG.md)."""
        backend = _plain_backend(self.tokenizer)
        if backend is None:
            return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        # One at a time: encode_batch hands a few short texts to a thread pool, which costs more than it saves.
        return [backend.encode(text, add_special_tokens=False).ids for text in texts]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Tokens of a conversation ending with a user turn, with the generation prompt (for chat)."""
        return self.encode(self.text(messages, generation_prompt=True))

    # -- trained samples ---------------------------------------------------------------------------

    def trained_turns(self, messages: list[dict]) -> list[int]:
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        return turns[-1:] if self.train_on == "last" else turns

    def split(self, messages: list[dict]) -> list[tuple[list[int], Tokenized]]:
        """The samples of a conversation as (trained turn indices, sample): turns whose samples are
        prefixes of a later turn's share that sample. Raises RenderError."""
        if self.markers:
            turns = self.trained_turns(messages)
            return [(turns, self._marked(messages, turns))]
        groups: list[tuple[list[int], Tokenized]] = []
        for i in reversed(self.trained_turns(messages)):
            alone = self._turn(messages, i)
            for turns, sample in groups:
                if sample.input_ids[: len(alone)] == alone.input_ids:
                    _overlay(sample, alone)
                    turns.insert(0, i)
                    break
            else:
                groups.insert(0, ([i], alone))
        return groups

    def tokenize(self, messages: list[dict], turns: list[int] | None = None) -> Tokenized:
        """One sample: `turns` (assistant message indices) trained in one sequence, or by default the
        last trained turn with every turn that shares its prefix. Raises RenderError, also when the
        given turns cannot share one sequence."""
        if self.markers:
            return self._marked(messages, turns or self.trained_turns(messages))
        if turns is None:
            return self.split(messages)[-1][1]
        *earlier, last = sorted(turns)
        sample = self._turn(messages, last)
        for i in earlier:
            alone = self._turn(messages, i)
            if sample.input_ids[: len(alone)] != alone.input_ids:
                raise RenderError(f"turn {i} is rendered differently once later turns follow; it cannot share a sample with turn {last}")
            _overlay(sample, alone)
        return sample

    def _turn(self, messages: list[dict], i: int) -> Tokenized:
        """Assistant turn `i` as inference sees it: the prompt of messages[:i], then the reply (and its
        reasoning, where kept and rendered) trained through the first token generation stops on."""
        history, message = messages[:i], messages[i]
        thought, reply = split_reasoning(message)
        if self.reasoning == "drop":
            thought = None
        prompt = self.text(history, generation_prompt=True)
        with_turn = self.text(history + [_assistant(message, reply, thought)])
        marked = self.text(history + [_assistant(message, REPLY, THOUGHT if thought else None)])
        if marked.count(REPLY) != 1:
            raise RenderError(f"turn {i}: the chat template does not write the reply as given, so its tokens cannot be found")
        before, _, after = marked.partition(REPLY)
        head, rendered_thought, _ = before.partition(THOUGHT)  # head: the text before the reasoning, if written
        lead = head if rendered_thought else before
        if not (with_turn.startswith(lead) and with_turn.endswith(after) and len(lead) + len(after) <= len(with_turn)):
            raise RenderError(f"turn {i}: the chat template changes the text around the reply with the reply itself")
        body = with_turn[: len(with_turn) - len(after)]
        # Training starts at the reasoning (with its `<think>` tag) where the template writes it in
        # this turn, else at the reply.
        start = _before_open_think(head, len(head)) if rendered_thought else len(before)
        thought = None if rendered_thought else thought
        text, trained_from = self._on_prompt(prompt, body, start, thought, i)
        ending = self._terminator(history, message, after, i)
        return self._tokens(text + ending, trained_from, len(text), i)

    def _on_prompt(self, prompt: str, body: str, start: int, thought: str | None, i: int) -> tuple[str, int]:
        """(sample text up to the reply's end, where training starts): the turn's reply put after the
        prompt inference would render. Three shapes of template:
        - the turn's text starts with the prompt (most): the turn as written, whatever the template
          puts between the generation prompt and the reply (Qwen3's empty think block) untrained;
        - the generation prompt opens a `<think>` block the turn does not write (DeepSeek-R1): the
          reasoning, or an empty block, closed before the reply;
        - the prompt writes more before the reply than the turn does (Mistral-Nemo puts the system
          prompt in the last user turn only): the reply after the prompt."""
        lead = body[:start]
        if lead.startswith(prompt):
            return body, start
        shared = len(os.path.commonprefix([prompt, lead]))
        extra, written = prompt[shared:], lead[shared:]
        reply = body[start:]
        if _OPEN_THINK_AT_END.search(extra) and THINK_OPEN not in written:
            if thought:
                return prompt + thought.strip("\n") + THOUGHT_END + reply, len(prompt)
            return prompt + THOUGHT_END + reply, len(prompt) + len(THOUGHT_END)
        if extra.endswith(written):
            return prompt + reply, len(prompt)
        raise RenderError(f"turn {i}: the generation prompt ends with {extra!r}, but the chat template writes {written!r} "
                          "before this reply: training would see another prompt than inference")

    def _terminator(self, history: list[dict], message: dict, after: str, i: int) -> str:
        """The text after the reply through the first token generation stops on. A template that ends
        a reply with nothing (its last message) or with the next turn's header (GLM-4) is rendered
        with one more user turn to see what closes the reply there."""
        found = self._through_stop(after)
        if found is None:
            _, _, after_next = self.text(history + [_assistant(message, REPLY, None), {"role": "user", "content": NEXT}]).partition(REPLY)
            found = self._through_stop(after_next.partition(NEXT)[0])
        if found is None:
            specials = [t for t in self.tokenizer.convert_ids_to_tokens(self.encode(after)) if t in self.tokenizer.all_special_tokens]
            fix = (f"set model.stop_tokens=[\"{specials[0]}\"] if that token ends a reply"
                   if specials else "use a template that ends replies with an end-of-turn token")
            raise RenderError(f"turn {i}: the chat template {NO_END}; {fix}")
        return found

    def _find_through_stop(self, text: str) -> str | None:
        """`text` through its first stop token, or None (cached per renderer as `_through_stop`)."""
        ids = self.encode(text)
        stop = next((k for k, t in enumerate(ids) if t in self.end_ids), None)
        return None if stop is None else self.tokenizer.decode(ids[: stop + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _tokens(self, text: str, trained_from: int, reply_end: int, i: int) -> Tokenized:
        ids, head, upto_reply = self.encode_many([text, text[:trained_from], text[:reply_end]])
        if ids[: len(head)] != head:
            raise RenderError(f"turn {i}: the tokens before the reply change when the reply follows")
        start = len(head)
        end = max(start, len(upto_reply))
        stop = next((k for k in range(end, len(ids)) if ids[k] in self.end_ids), len(ids) - 1)
        labels = [IGNORE] * start + ids[start : stop + 1]
        return Tokenized(ids[: stop + 1], labels)

    def _marked(self, messages: list[dict], turns: list[int]) -> Tokenized:
        """The template's own `{% generation %}` spans, each through the next stop token."""
        out = self.tokenizer.apply_chat_template(_fold(messages) if self.fold_system else messages, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        spans, k = [], 0
        while k < len(ids):
            if mask[k]:
                end = k
                while end < len(ids) and mask[end]:
                    end += 1
                stop = next((j for j in range(k, len(ids)) if ids[j] in self.end_ids and j >= end - 1), end - 1)
                spans.append((k, stop))
                k = end
            else:
                k += 1
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(spans) != len(assistants):
            raise RenderError(f"the template's generation markers cover {len(spans)} replies of {len(assistants)}")
        labels = [IGNORE] * len(ids)
        for turn, (a, b) in zip(assistants, spans):
            if turn in turns:
                labels[a : b + 1] = ids[a : b + 1]
        last = max((k for k, label in enumerate(labels) if label != IGNORE), default=len(ids) - 1)
        return Tokenized(ids[: last + 1], labels[: last + 1])


STRATEGY_WHY = {
    "prefix": "each reply is trained where the template renders it, all turns in one sample",
    "per-turn": "the template renders earlier turns differently once later turns follow, so each reply is "
                "trained on the prompt inference would render for it; such turns get samples of their own",
    "generation-markers": "the template's {% generation %} blocks mark the replies",
}


def _overlay(sample: Tokenized, alone: Tokenized) -> None:
    """Train in `sample` what `alone` (a turn whose sample is a prefix of it) trains."""
    sample.labels[: len(alone)] = [a if a != IGNORE else b for a, b in zip(alone.labels, sample.labels)]


def _assistant(message: dict, reply: str, thought: str | None) -> dict:
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    out["content"] = reply
    if thought:
        out["reasoning_content"] = thought
    return out


def _fold(messages: list[dict]) -> list[dict]:
    """The system prompt in front of the first user message (for templates with no system role)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    rest = list(messages[1:])
    for k, m in enumerate(rest):
        if m["role"] == "user":
            rest[k] = {**m, "content": messages[0]["content"] + "\n\n" + m["content"]}
            return rest
    return rest


def _plain_backend(tokenizer):
    """The Rust tokenizer behind a fast tokenizer, when `tokenizer(text, add_special_tokens=False)` is
    exactly its `encode`: transformers' own encoding (not overridden by a model's tokenizer class), no
    truncation or padding set, special tokens matched as transformers would. Else None."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not isinstance(tokenizer, PreTrainedTokenizerFast):
        return None
    cls = type(tokenizer)
    if cls._encode_plus is not PreTrainedTokenizerFast._encode_plus or cls.__call__ is not PreTrainedTokenizerFast.__call__:
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def _before_open_think(text: str, at: int) -> int:
    """`at` moved back over a `<think>` tag (and the whitespace after it) that directly precedes it."""
    head = text[:at].rstrip()
    return len(head) - len(THINK_OPEN) if head.endswith(THINK_OPEN) else at
