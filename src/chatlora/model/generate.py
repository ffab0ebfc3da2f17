"""Replies from a chat model: batched (`generate_replies`) or streamed piece by piece (`stream_reply`).

Both stop on the generation config's stop tokens (which chatlora makes include the template's
end-of-turn token) and take the same sampling options: `temperature` 0 means greedy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from chatlora.data.render import Renderer
from chatlora.model.load import stop_ids


@dataclass
class Reply:
    text: str
    """The reply, stop token removed, surrounding whitespace stripped."""
    tokens: int
    """New tokens generated, the stop token included."""
    stopped: bool
    """Ended on a stop token before the token limit."""
    ids: list[int] = field(default_factory=list)
    """The reply's token ids, the stop token excluded."""


# Temperatures below this sample greedily. At them sampling is the argmax anyway (a token 0.001 below
# the best has probability exp(-0.001 / t), which float32 holds as 0), and dividing float32 logits by
# them overflows to inf (or, under 1e-38, by 0): softmax then gives NaN and sampling fails.
GREEDY_BELOW = 1e-5


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


# A seed is a signed 64-bit integer, as in vLLM; torch.Generator.manual_seed overflows beyond 2**64.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _generate_options(temperature: float, top_p: float, top_k: int, repetition_penalty: float) -> dict:
    """transformers' generate() arguments for chatlora's sampling options."""
    if is_greedy(temperature):
        # None overrides whatever sampling defaults the model's generation config carries.
        options = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k or None}
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = repetition_penalty
    return options


def _reply(tokenizer, new: list[int], stops: set[int]) -> Reply:
    """Cut a generated row at its first stop token."""
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    ids = new if cut is None else new[:cut]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Reply(text.strip(), len(ids) + (cut is not None), cut is not None, ids)


@torch.no_grad()
def generate_replies(model, renderer: Renderer, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 8,
                     *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                     seed: int | None = None, progress=None, min_new_tokens: int = 0) -> list[Reply]:
    """Replies to conversations that end with a user turn, `batch_size` at a time (left-padded).
    Greedy unless `temperature` > 0. `progress` (a tqdm bar, optional) is advanced per prompt.
    `min_new_tokens` holds the stop tokens back that long (fixed-length replies for benchmarks)."""
    tokenizer = renderer.tokenizer
    stops = set(stop_ids(model.generation_config))
    device = next(model.parameters()).device
    options = _generate_options(temperature, top_p, top_k, repetition_penalty)
    if min_new_tokens:
        options["min_new_tokens"] = min_new_tokens
    if seed is not None:
        torch.manual_seed(seed)
    replies: list[Reply] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = [renderer.prompt_ids(p) for p in prompts[start : start + batch_size]]
        longest = max(map(len, batch))
        # Left padding, so every prompt ends where generation starts.
        ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (longest - len(b)) + [1] * len(b) for b in batch], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **options)
        replies += [_reply(tokenizer, row, stops) for row in out[:, longest:].tolist()]
        if progress is not None:
            progress.update(len(batch))
    model.train(was_training)
    return replies


class IncrementalText:
    """Token ids in, new text out, in time linear in the reply's length.

    Each step decodes only a short window (the tokens since the last text sent, with a few before
    them as context, as text-generation servers do): decoding a token alone would lose the space
    SentencePiece tokenizers put in front of a word. Text is held back while it ends inside a
    multi-byte character (a byte-level token can hold half of a Chinese character's UTF-8 bytes,
    which decodes to U+FFFD). Leading whitespace is dropped, as in Reply.text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were sent already; they are context for what follows
        self.started = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._new(final=False)

    def flush(self) -> str:
        """What is left, an unfinished character included (the reply ended inside it)."""
        return self._new(final=True)

    def _new(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.ids[self.prefix : self.read])
        text = decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        piece = text[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece


class ReplyStream:
    """The text of one reply, piece by piece as tokens are generated; iterate it.

    One forward pass per token with the model's KV cache, on the caller's thread: no background
    thread to cancel, and closing (or abandoning) the iterator stops generation. After the last
    piece, `reply` holds the whole Reply and `prompt_tokens` the prompt's length.
    """

    def __init__(self, model, renderer: Renderer, messages: list[dict], max_new_tokens: int,
                 temperature: float, top_p: float, top_k: int, repetition_penalty: float, seed: int | None,
                 decoder=None):
        from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                  TopKLogitsWarper, TopPLogitsWarper)

        self.model, self.tokenizer = model, renderer.tokenizer
        self.prompt = renderer.prompt_ids(messages)
        self.prompt_tokens = len(self.prompt)
        self.max_new_tokens = max_new_tokens
        self.stops = set(stop_ids(model.generation_config))
        self.greedy = is_greedy(temperature)
        # The same processors, in the same order, as transformers' generate() builds from these options.
        self.processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if not self.greedy:
            self.processors.append(TemperatureLogitsWarper(temperature))
            if top_k:
                self.processors.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.processors.append(TopPLogitsWarper(top_p))
        self.device = next(model.parameters()).device
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(self.device).manual_seed(seed)
        self.ids: list[int] = []
        self.stopped = False
        # The fast path (a StaticDecoder) when there is one and the reply fits its cache.
        self.decoder = decoder if decoder is not None and decoder.room(len(self.prompt), max_new_tokens) else None
        self._text = IncrementalText(self.tokenizer)
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()

    @property
    def reply(self) -> Reply:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return Reply(text.strip(), len(self.ids) + self.stopped, self.stopped, list(self.ids))

    def _step(self, input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, object]:
        # transformers renamed `past_key_values` to `cache` (5.2x); the output's field tells which
        # name this version takes back, so both the CPU pins and the GPU image work.
        kwargs = {} if cache is None else {self._cache_name: cache}
        # inference_mode per call, not around the generator: a context held across `yield` would
        # leak into the caller's code between pieces.
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **kwargs)
        self._cache_name = "cache" if "cache" in out else "past_key_values"
        return out.logits[:, -1].float(), out[self._cache_name]

    def _pick(self, logits: torch.Tensor, seen: torch.Tensor) -> int:
        with torch.inference_mode():
            scores = self.processors(seen, logits)
            if self.greedy:
                return int(scores.argmax(-1))
            probs = torch.softmax(scores, dim=-1)
            return int(torch.multinomial(probs, 1, generator=self.generator))

    def _run(self) -> Iterator[str]:
        was_training = self.model.training
        self.model.eval()
        try:
            seen = torch.tensor([self.prompt], device=self.device)
            if self.decoder is not None:
                self.decoder.reset()
                logits, cache = self.decoder.add(self.prompt)[None], None
            else:
                logits, cache = self._step(seen, None)
            for _ in range(self.max_new_tokens):
                token = self._pick(logits, seen)
                if token in self.stops:
                    self.stopped = True
                    break
                self.ids.append(token)
                piece = self._text.add(token)
                if piece:
                    yield piece
                if len(self.ids) == self.max_new_tokens:
                    break  # no forward pass for a token that will never be used
                step = torch.tensor([[token]], device=self.device)
                seen = torch.cat([seen, step], dim=1)
                if self.decoder is not None:
                    logits = self.decoder.step(step[0])
                else:
                    logits, cache = self._step(step, cache)
            piece = self._text.flush()
            if piece:
                yield piece
        finally:
            self.model.train(was_training)


def stream_reply(model, renderer: Renderer, messages: list[dict], max_new_tokens: int = 512, *, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 decoder=None) -> ReplyStream:
    """Stream the reply to `messages` (a conversation ending with a user turn) as text pieces.

        stream = stream_reply(model, renderer, [{"role": "user", "content": "Hi"}], temperature=0.7)
        for piece in stream:
            print(piece, end="", flush=True)
        stream.reply.stopped  # True when it ended on the end-of-turn token

    Greedy unless `temperature` > 0; `seed` makes sampling repeatable without touching torch's global RNG.
    `decoder` (a chatlora.model.decode.StaticDecoder over `model`) is the fast path; a reply too long
    for its cache is generated without it.
    """
    return ReplyStream(model, renderer, messages, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                       decoder)
