"""`chatlora merge RUN OUT`: a standalone model (safetensors, tokenizer, chat template, generation
config that stops on the end-of-turn token), checked against the adapter it came from.

Read top to bottom in export/merged.py (`merge_to`, which `chatlora export --format hf|gguf` runs
too): refuse a non-finite adapter → load base + adapter → reference logits on held-out
conversations → merge → save to a temporary folder → reload from disk as any other program would →
compare logits (max difference, top-1 agreement) → rename into place, or fail and leave nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from chatlora.export.merged import merge_to


def merge(target: str, out: str, *, model: str | None = None, dtype: str = "auto", data: str | None = None,
          prompts: int = 8, max_diff: float | None = None, min_top1: float | None = None, device: str | None = None,
          echo: Callable[[str], None] = print) -> dict:
    """Merge the adapter into the base weights and save a standalone model to `out`; returns the parity result.

    Raises ChatloraError when `out` exists and is not empty, when the adapter holds NaN/inf, or when
    the reloaded merged model's logits fall outside the tolerance (nothing is left at `out`).
    """
    return merge_to(target, out, model=model, dtype=dtype, data=data, prompts=prompts, max_diff=max_diff,
                    min_top1=min_top1, device=device, echo=echo)
