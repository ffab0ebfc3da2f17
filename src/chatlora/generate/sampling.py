"""How the next token is chosen: the one options type (`Sampling`) and the samplers that read it.

Every caller passes its options as a `Sampling`: the chat command builds one from its flags, eval
and the training-time monitor a greedy one, the HTTP layer one from the request's JSON (each caller
checks the values it accepts and words its own errors). Two samplers read it, each kept exactly as
it was so that a seeded reply stays the same token for token:

- `generate_options` / `processors`: transformers' own (generate(), or the same logits processors in
  the same order, token by token), for replies of chat, eval, the monitor and the compare report;
- `pick_tokens`: the engine's rows (serve and web), each drawing from its own seeded generator so
  that a seeded reply does not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Temperatures below this sample greedily. At them sampling is the argmax anyway (a token 0.001 below
# the best has probability exp(-0.001 / t), which float32 holds as 0), and dividing float32 logits by
# them overflows to inf (or, under 1e-38, by 0): softmax then gives NaN and sampling fails.
GREEDY_BELOW = 1e-5

# A seed is a signed 64-bit integer, as in vLLM; torch.Generator.manual_seed overflows beyond 2**64.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Sampling:
    """What one reply asks of the generator. The defaults are greedy and change nothing."""

    max_new_tokens: int | None = None
    """New tokens at most, the stop token included; None (the engine only): as many as the context
    and the server allow."""
    temperature: float = 0.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Sample from the k most likely tokens; 0 = off. Replies and streams only (not the engine's rows)."""
    repetition_penalty: float = 1.0
    """1.0 = off; 1.1 discourages tokens already in the conversation. Replies and streams only."""
    seed: int | None = None
    """Makes sampling repeatable: a stream's and an engine row's own generator, torch's global RNG for
    batched replies (transformers' generate draws from it)."""
    stop: tuple[str, ...] = ()
    """Strings that end the reply, cut before the first one found. The engine only."""
    ignore_eos: bool = False
    """Keep going past the model's stop tokens (fixed-length replies for benchmarks; as in vLLM). The
    engine only."""
    min_new_tokens: int = 0
    """Hold the stop tokens back that long (fixed-length batched replies for benchmarks)."""

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)  # 0, or so small that dividing logits by it overflows


def generate_options(sampling: Sampling) -> dict:
    """transformers' generate() arguments for these options."""
    if sampling.greedy:
        # None overrides whatever sampling defaults the model's generation config carries.
        options = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    else:
        options = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p,
                   "top_k": sampling.top_k or None}
    if sampling.repetition_penalty != 1.0:
        options["repetition_penalty"] = sampling.repetition_penalty
    if sampling.min_new_tokens:
        options["min_new_tokens"] = sampling.min_new_tokens
    return options


def processors(sampling: Sampling):
    """The same logits processors, in the same order, as transformers' generate() builds from these
    options (a stream applies them one token at a time)."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    out = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    if not sampling.greedy:
        out.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            out.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            out.append(TopPLogitsWarper(sampling.top_p))
    return out


def pick_tokens(logits: torch.Tensor, rows: list) -> list[int]:
    """The next token of every row (generate/rows.py Row: its `sampling` and `generator`): argmax for
    greedy rows, a draw from the row's generator otherwise."""
    tokens = logits.argmax(-1)
    for i, row in enumerate(rows):
        p = row.sampling
        if p.greedy:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # Drop tokens whose preceding mass already reaches top_p: the nucleus always keeps the top token.
            sorted_probs[(sorted_probs.cumsum(0) - sorted_probs) >= p.top_p] = 0
            tokens[i] = order[torch.multinomial(sorted_probs, 1, generator=row.generator)]
        else:
            tokens[i] = torch.multinomial(probs, 1, generator=row.generator)[0]
    return tokens.tolist()
