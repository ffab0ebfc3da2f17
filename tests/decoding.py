"""Greedy decoding of several rows sharing one decoder, as rows join and leave: shared by the decode
tests (unit/generate/test_decode.py), the families' tests and the GPU tests."""

from __future__ import annotations

PROMPTS = [[5, 6, 7, 8, 9], [100, 20, 30], list(range(40, 60)), [250, 1, 2, 3, 4, 5, 6, 7]]


def greedy_rows(decoder, joins: dict[int, int], limits: dict[int, int], prompts=PROMPTS, steps: int = 200) -> tuple[dict[int, list[int]], bool]:
    """Greedy replies of rows sharing `decoder`: prompt `joins[step]` joins at that step and leaves
    after `limits[prompt]` tokens. Returns the tokens per prompt and whether the cache ever shifted left."""
    out: dict[int, list[int]] = {}
    live: list[int] = []
    shifted = False
    for step in range(steps):
        if step in joins:
            i = joins[step]
            out[i] = [int(decoder.add(prompts[i]).argmax())]
            live.append(i)
        if not live:
            break
        before = decoder.col
        logits = decoder.step([out[i][-1] for i in live])
        shifted |= decoder.col <= before
        keep = []
        for j, i in enumerate(live):
            out[i].append(int(logits[j].argmax()))
            if len(out[i]) < limits[i]:
                keep.append(j)
        live = [live[k] for k in decoder.keep(keep)]
    return out, shifted
