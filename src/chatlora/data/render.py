"""Render conversations with the tokenizer's own chat template and mark the trained tokens.

The trained span of an assistant turn is found by rendering prefixes: the conversation up to the
turn with the generation prompt, and up to the end of the turn. The tokens between them are the
reply and the template's end-of-turn token. No marker strings, so any template works; a template
that renders earlier turns differently once later turns follow is reported, not guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass

from chatlora.errors import ChatloraError

IGNORE = -100

# End-of-turn tokens of common chat templates. Together with the tokenizer's eos token and the
# generation config's stop tokens they tell where a reply ends inside the rendered turn.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|eot|>")


class RenderError(ChatloraError, ValueError):
    """A conversation the template cannot render, or not into a prefix-consistent token sequence."""


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


class Renderer:
    """Turns conversations into input ids and labels with one tokenizer's template."""

    def __init__(self, tokenizer, stop_ids: set[int], train_on: str = "all"):
        if not getattr(tokenizer, "chat_template", None):
            raise RenderError("the tokenizer has no chat template; use a chat model or a tokenizer folder with one")
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.end_ids = set(stop_ids)
        if tokenizer.eos_token_id is not None:
            self.end_ids.add(tokenizer.eos_token_id)
        vocab = tokenizer.get_vocab()
        self.end_ids |= {vocab[t] for t in KNOWN_END_OF_TURN if t in vocab}

    def end_of_turn(self) -> int | None:
        """The token that ends an assistant turn in this template (ChatML: `<|im_end|>`), or None."""
        probe = self.tokenize([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
        return probe.labels[-1] if probe.labels[-1] in self.end_ids else None

    def text(self, messages: list[dict], generation_prompt: bool = False) -> str:
        """The rendered conversation. Raises RenderError when the template fails or refuses it (many
        templates `raise_exception` on roles they do not support, a system message for one)."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as e:
            raise RenderError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def encode(self, text: str) -> list[int]:
        # The rendered text carries the template's own special tokens (BOS included), as transformers
        # does in apply_chat_template(tokenize=True).
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Tokens of a conversation ending with a user turn, with the generation prompt (for chat)."""
        return self.encode(self.text(messages, generation_prompt=True))

    def tokenize(self, messages: list[dict]) -> Tokenized:
        """Input ids and labels; every assistant turn (or the last, by `train_on`) is trained up to and
        including its end-of-turn token. Untrained tokens after the last trained one are dropped.

        Raises RenderError when the template is not prefix-consistent for this conversation.
        """
        full_text = self.text(messages)
        ids = self.encode(full_text)
        labels = [IGNORE] * len(ids)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last":
            turns = turns[-1:]
        for i in turns:
            before = self.text(messages[:i], generation_prompt=True)
            upto = self.text(messages[: i + 1])
            if not (full_text.startswith(upto) and upto.startswith(before)):
                raise RenderError(
                    f"the chat template renders turn {i} differently once later turns follow "
                    "(it rewrites or drops earlier turns), so the reply's tokens cannot be found"
                )
            start, end = len(self.encode(before)), len(self.encode(upto))
            if ids[:start] != self.encode(before):
                raise RenderError(f"turn {i}: the tokens before the reply change when the reply follows")
            span = ids[start:end]
            stop = max((k for k, t in enumerate(span) if t in self.end_ids), default=len(span) - 1)
            labels[start : start + stop + 1] = span[: stop + 1]
        last = max((k for k, label in enumerate(labels) if label != IGNORE), default=len(ids) - 1)
        return Tokenized(ids[: last + 1], labels[: last + 1])
