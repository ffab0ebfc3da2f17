"""Batched greedy (or sampled) replies, stopping on the generation config's stop tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatlora.data.render import Renderer
from chatlora.model.load import stop_ids


@dataclass
class Reply:
    text: str
    tokens: int
    """New tokens generated, the stop token included."""
    stopped: bool
    """Ended on a stop token before the token limit."""


@torch.no_grad()
def generate_replies(model, renderer: Renderer, prompts: list[list[dict]], max_new_tokens: int = 64, batch_size: int = 8, **sampling) -> list[Reply]:
    """Replies to conversations that end with a user turn. Greedy unless sampling options are given."""
    tokenizer = renderer.tokenizer
    stops = set(stop_ids(model.generation_config))
    device = next(model.parameters()).device
    replies: list[Reply] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch = [renderer.prompt_ids(p) for p in prompts[start : start + batch_size]]
        longest = max(map(len, batch))
        # Left padding, so every prompt ends where generation starts.
        ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (longest - len(b)) + [1] * len(b) for b in batch], device=device)
        options = {"do_sample": False, **sampling} if sampling else {"do_sample": False}
        if not options.get("do_sample"):
            options.update(temperature=None, top_p=None, top_k=None)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **options)
        for row in out[:, longest:].tolist():
            new = []
            for t in row:
                new.append(t)
                if t in stops:
                    break
            stopped = new[-1] in stops if new else False
            text = tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
            replies.append(Reply(text.strip(), len(new), stopped))
    model.train(was_training)
    return replies
