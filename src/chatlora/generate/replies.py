"""Replies to conversations: batched (`generate_replies`: chat's prompts file, eval, the
training-time monitor, the compare report) or streamed piece by piece (`stream_reply`: the chat
command), the one place where a model (an adapter, merged or not) becomes a reply's text outside the
engine's rows (generate/engine.py).

Both stop on the generation config's stop tokens (which chatlora makes include the template's
end-of-turn token) and take their options as a `Sampling` (generate/sampling.py): temperature 0
means greedy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from chatlora.data.render import Renderer
from chatlora.generate.sampling import Sampling, generate_options, processors
from chatlora.generate.text import TextStream
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


def _reply(tokenizer, new: list[int], stops: set[int]) -> Reply:
    """Cut a generated row at its first stop token."""
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    ids = new if cut is None else new[:cut]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Reply(text.strip(), len(ids) + (cut is not None), cut is not None, ids)


def _limit(sampling: Sampling) -> int:
    if not isinstance(sampling, Sampling):  # the options were keyword arguments once: say what changed
        raise TypeError(f"expected a chatlora.generate.sampling.Sampling, got {type(sampling).__name__}")
    if sampling.max_new_tokens is None:
        raise ValueError("Sampling.max_new_tokens must be set for replies outside the engine")
    return sampling.max_new_tokens


@torch.no_grad()
def generate_replies(model, renderer: Renderer, prompts: list[list[dict]], sampling: Sampling, batch_size: int = 8,
                     *, progress=None) -> list[Reply]:
    """Replies to conversations that end with a user turn, `batch_size` at a time (left-padded), by
    transformers' generate(). Greedy unless `sampling.temperature` > 0; a seed seeds torch's global
    RNG, which generate() draws from. `progress` (a tqdm bar, optional) is advanced per prompt."""
    max_new_tokens = _limit(sampling)
    tokenizer = renderer.tokenizer
    stops = set(stop_ids(model.generation_config))
    device = next(model.parameters()).device
    options = generate_options(sampling)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
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


class ReplyStream:
    """The text of one reply, piece by piece as tokens are generated; iterate it.

    One forward pass per token with the model's KV cache, on the caller's thread: no background
    thread to cancel, and closing (or abandoning) the iterator stops generation. After the last
    piece, `reply` holds the whole Reply and `prompt_tokens` the prompt's length.
    """

    def __init__(self, model, renderer: Renderer, messages: list[dict], sampling: Sampling, decoder=None):
        self.model, self.tokenizer = model, renderer.tokenizer
        self.prompt = renderer.prompt_ids(messages)
        self.prompt_tokens = len(self.prompt)
        self.max_new_tokens = max_new_tokens = _limit(sampling)
        self.stops = set(stop_ids(model.generation_config))
        self.greedy = sampling.greedy
        self.processors = processors(sampling)
        self.device = next(model.parameters()).device
        self.generator = None
        if sampling.seed is not None:
            self.generator = torch.Generator(self.device).manual_seed(sampling.seed)
        self.ids: list[int] = []
        self.stopped = False
        # The fast path (a StaticDecoder) when there is one and the reply fits its cache.
        self.decoder = decoder if decoder is not None and decoder.room(len(self.prompt), max_new_tokens) else None
        self._text = TextStream(self.tokenizer)
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
                piece = self._text.push(token)
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
            piece = self._text.finish()
            if piece:
                yield piece
        finally:
            self.model.train(was_training)


def stream_reply(model, renderer: Renderer, messages: list[dict], sampling: Sampling, *, decoder=None) -> ReplyStream:
    """Stream the reply to `messages` (a conversation ending with a user turn) as text pieces.

        stream = stream_reply(model, renderer, [{"role": "user", "content": "Hi"}],
                              Sampling(max_new_tokens=512, temperature=0.7))
        for piece in stream:
            print(piece, end="", flush=True)
        stream.reply.stopped  # True when it ended on the end-of-turn token

    Greedy unless `sampling.temperature` > 0; a seed makes sampling repeatable without touching
    torch's global RNG. `decoder` (a chatlora.generate.decode.StaticDecoder over `model`) is the fast
    path; a reply too long for its cache is generated without it.
    """
    return ReplyStream(model, renderer, messages, sampling, decoder)
