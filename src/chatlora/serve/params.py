"""A request's sampling options, from the HTTP request (or the web page's controls) to the engine's
`Sampling`, checked with OpenAI's ranges and defaults; a bad value is a RequestError naming it."""

from __future__ import annotations

from chatlora.generate.events import RequestError
from chatlora.generate.sampling import SEED_MAX, SEED_MIN, Sampling


def request_sampling(max_tokens: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
                     seed: int | None = None, stop: tuple[str, ...] = (), ignore_eos: bool = False) -> Sampling:
    """The engine's Sampling for these request options (OpenAI's names and defaults: temperature 1).
    Raises RequestError for a value out of range."""
    if max_tokens is not None and max_tokens < 1:
        raise RequestError("max_tokens must be at least 1", param="max_tokens")
    if not 0 <= temperature <= 2:
        raise RequestError("temperature must be between 0 and 2", param="temperature")
    if not 0 < top_p <= 1:
        raise RequestError("top_p must be greater than 0 and at most 1", param="top_p")
    if seed is not None and not SEED_MIN <= seed <= SEED_MAX:
        raise RequestError(f"seed must be between {SEED_MIN} and {SEED_MAX} (a 64-bit integer)", param="seed")
    if any(not s for s in stop):
        raise RequestError("stop strings must not be empty", param="stop")
    return Sampling(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
                    ignore_eos=ignore_eos)
