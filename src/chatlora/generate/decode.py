"""Fast decoding: a KV cache of fixed shape that rows join and leave, and one-token steps replayed
from CUDA graphs.

Eager `generate` on a 7B model spends most of each token in Python and kernel launches, far below
what the GPU's memory bandwidth allows (measured: docs/benchmarks.md). Here the cache never changes shape:
`slots` rows x `columns` positions per layer, allocated once. A decode step then has the same shapes
every time, so it can be recorded once as a CUDA graph (per batch-size and length bucket) and
replayed for a few microseconds of CPU time. `compile` mode records `torch.compile`'s fused kernels
instead of the eager ones (fewer, faster kernels; compiled once, with symbolic sizes, for every
bucket). Where q/k/v and gate/up are plain linear layers they run as one matmul each (model/fuse.py).

How rows share the cache: every row writes its next token's key/value at the same column, `col`,
which moves right by one per step. A row that joins has its prompt prefilled alone and written into
the columns just left of `col`; its attention mask opens exactly its own columns, and its position
ids count its own tokens, so its greedy reply is the one it gets alone. When `col` reaches the end,
all rows shift left by the free space in front of the oldest row (every row ends at `col`, so one
shift fits all).

The model is transformers' own: this cache is handed to its forward in place of a `Cache` (it has
the `update` method every attention layer calls) and the 4D mask is passed ready-made, which
transformers uses as is. Models with sliding-window layers (Gemma 2 and 3, Mistral v0.1) get a second
mask that also closes the columns outside the window, for those layers. Works across transformers
5.17-5.25, whose cache classes differ.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from chatlora.errors import ChatloraError
from chatlora.generate.kv_cache import SlotCache, base, buckets, cache_keyword, plan_columns, text_config, unsupported, window
from chatlora.model.decode_modes import resolve_mode
from chatlora.model.fuse import fuse_projections
from chatlora.model.layers import compile_settings, inductor_cache

log = logging.getLogger(__name__)


@dataclass
class SlotState:
    start: int
    """First column of the row's prompt."""


class StaticDecoder:
    """Rows of greedy or sampled generation over a `SlotCache`; rows 0..live-1 are in use.

        decoder = StaticDecoder(model, slots=32, columns=2048, mode="graphs")
        logits = decoder.add(prompt_ids)        # [vocab]: the first new token's logits
        logits = decoder.step([token, ...])     # [live, vocab]: one token per live row
        decoder.keep([0, 2])                    # rows 1, 3, ... leave; returns the new row order

    `variant` names what the model computes now (an adapter, or the base model with adapters off):
    a recorded graph replays the computation it recorded, so each variant has its own graphs.
    """

    def __init__(self, model, slots: int, columns: int, mode: str = "graphs", batch_buckets: list[int] | None = None):
        if mode not in ("graphs", "compile", "static"):
            raise ValueError(f"StaticDecoder mode {mode!r}")
        why = unsupported(model)
        if why:
            raise ChatloraError(f"the fast decode path does not support this model ({why}); use --decode eager")
        self.model, self.mode, self.slots, self.columns = model, mode, slots, columns
        self.device = next(model.parameters()).device
        self.dtype = base(model).get_input_embeddings().weight.dtype
        self.cache = SlotCache(text_config(model).num_hidden_layers, slots, columns, self.device)
        self.cache_kw = cache_keyword(model)
        self.ids = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        # Additive mask (0: attend, dtype min: not), which sdpa and eager attention both take.
        self.blocked = torch.finfo(self.dtype).min
        self.mask = torch.full((slots, 1, 1, columns), self.blocked, dtype=self.dtype, device=self.device)
        size, self.full_layers = window(model)
        # A window as wide as the cache never closes a column: such a model needs no second mask.
        self.window = size if size is not None and size < columns else None
        """Tokens a sliding-window layer sees, itself included; None when no window narrows what the cache holds."""
        self.sliding = self.mask.clone() if self.window else None
        """`mask` with the columns outside the window closed (made from it at each step)."""
        self.batch_buckets = sorted(set(batch_buckets or buckets(slots, 1)))
        if self.batch_buckets[-1] != slots:
            self.batch_buckets.append(slots)
        self.length_buckets = buckets(columns, 128)
        self.variant = "default"
        self.rows: list[SlotState] = []
        self.col = 0
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None
        self._forward = self._eager_forward
        if mode == "compile":
            # The whole step compiled, sizes symbolic: one compile (the slow part of a start) serves
            # every length bucket and batch size above 1; batch 1 is compiled on its own (dynamo
            # specialises sizes of 1). Compiling each decoder layer alone instead was measured slower
            # to start and to run: dynamo recompiles per layer (docs/benchmarks.md, bench/LOG.md).
            compile_settings()
            self._forward = torch.compile(self._eager_forward, dynamic=True)
        self.add([0])  # a first prefill gives each layer's cache its shape (kv_cache.SlotCache)
        self.reset()

    @property
    def live(self) -> int:
        return len(self.rows)

    def reset(self) -> None:
        self.rows, self.col = [], 0

    # -- rows join -------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, prompt: list[int]) -> torch.Tensor:
        """Prefill a new row with `prompt`; returns the logits of its first new token (float32).
        Raises ChatloraError when every slot is taken or the prompt leaves no column to generate in."""
        length = len(prompt)
        if self.live >= self.slots:
            raise ChatloraError(f"all {self.slots} rows of the decode cache are in use")
        if length >= self.columns:
            raise ChatloraError(f"the prompt has {length} tokens; the decode cache holds {self.columns} per row")
        if not self.rows:
            self.col = 0
        if self.col >= self.columns:
            self._shift(min(r.start for r in self.rows))
        if self.col < length:
            # The prompt must end at `col`: move the rows already there right to make room (early,
            # when they are short), so every row's columns stay one unbroken run.
            if self.rows:
                self._shift(self.col - length)
            self.col = length
        row, start = self.live, self.col - length
        ids = torch.tensor([prompt], device=self.device)
        positions = torch.arange(length, device=self.device)[None]
        causal = torch.full((length, length), self.blocked, dtype=self.dtype, device=self.device).triu(1)
        sliding = None
        if self.window:
            far = positions[0, :, None] - positions[0, None, :] >= self.window
            sliding = causal.masked_fill(far, self.blocked)[None, None]
        self.cache.prefill = (row, start)
        try:
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=self._masks(causal[None, None], sliding), use_cache=True,
                             logits_to_keep=1, **{self.cache_kw: self.cache})
        finally:
            self.cache.prefill = None
        self.mask[row].fill_(self.blocked)
        self.mask[row, :, :, start : self.col] = 0
        self.positions[row] = length
        self.rows.append(SlotState(start))
        return out.logits[0, -1].float()

    def room(self, prompt_tokens: int, new_tokens: int) -> bool:
        """Whether a row of this prompt and reply length fits the cache at all."""
        return prompt_tokens + new_tokens <= self.columns

    # -- one token for every live row --------------------------------------------------------------

    @torch.inference_mode()
    def step(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Feed each live row its next token; returns the logits of the token after it, [live, vocab]
        float32 (a copy: the graph's output buffer is overwritten by the next step)."""
        n = self.live
        if self.col >= self.columns:
            self._shift(min(r.start for r in self.rows))
        tokens = torch.as_tensor(tokens, device=self.device).view(n, 1)
        self.ids[:n].copy_(tokens)
        self.mask[:n, :, :, self.col] = 0  # the new token sees itself
        if self.sliding is not None:
            self.sliding[:n] = self.mask[:n]
            if self.col >= self.window:  # a key `window` or more tokens back is out of sight
                self.sliding[:n, :, :, : self.col - self.window + 1] = self.blocked
        self.cache.column.fill_(self.col)
        batch = next(b for b in self.batch_buckets if b >= n)
        width = next(w for w in self.length_buckets if w > self.col)
        # A copy also in float32 (where .float() would hand out the graph's output buffer itself).
        logits = self._run(batch, width)[:n].to(torch.float32, copy=True)
        self.positions[:n] += 1
        self.col += 1
        return logits

    def _eager_forward(self, batch: int, width: int) -> torch.Tensor:
        self.cache.batch, self.cache.width = batch, width
        sliding = None if self.sliding is None else self.sliding[:batch, :, :, :width]
        out = self.model(input_ids=self.ids[:batch], position_ids=self.positions[:batch],
                         attention_mask=self._masks(self.mask[:batch, :, :, :width], sliding), use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: self.cache})
        return out.logits[:, -1]

    def _masks(self, full: torch.Tensor, sliding: torch.Tensor | None):
        """The attention mask the model takes: one 4D mask for every layer, or, for a model with
        layers of both kinds, one per layer type (transformers takes such a dict as it is)."""
        if sliding is None:
            return full
        return {"full_attention": full, "sliding_attention": sliding} if self.full_layers else sliding

    def _run(self, batch: int, width: int) -> torch.Tensor:
        if self.mode == "static" or self.device.type != "cuda":
            return self._forward(batch, width)
        key = (self.variant, batch, width)
        if key not in self._graphs:
            self._graphs[key] = self._record(batch, width)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _record(self, batch: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Record one decode step. The warm-up runs really compute the coming step (same inputs, same
        column), so recording in the middle of serving changes nothing but the time it takes."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # allocator, cuBLAS workspaces and (compile mode) compiling, outside the graph
                self._forward(batch, width)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(batch, width)
        return graph, logits

    def warm_up(self, batches: list[int] | None = None) -> int:
        """Record the graphs for these batch buckets (all by default) and every length now, for the
        current variant, so no request waits for one. Returns how many were recorded."""
        if self.mode == "static" or self.device.type != "cuda":
            return 0
        saved = self.rows, self.col
        self.rows, self.col = [], 0
        recorded = 0
        try:
            with torch.inference_mode():
                self.cache.column.zero_()
                # Largest first, as the graphs share one memory pool.
                for batch in sorted(batches or self.batch_buckets, reverse=True):
                    for width in self.length_buckets:
                        key = (self.variant, batch, width)
                        if key not in self._graphs:
                            self._graphs[key] = self._record(batch, width)
                            recorded += 1
        finally:
            self.rows, self.col = saved
        return recorded

    # -- rows leave ------------------------------------------------------------------------------

    def keep(self, rows: list[int]) -> list[int]:
        """Keep these live rows (ascending), drop the others. Rows are moved into the holes from the
        end, as few as possible; returns the kept rows' old indices in their new order."""
        order = list(range(self.live))
        kept = set(rows)
        n = len(rows)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in range(n, self.live) if i in kept]
        with torch.inference_mode():
            for hole, mover in zip(holes, movers):
                self._move(mover, hole)
                order[hole] = mover
                self.rows[hole] = self.rows[mover]
        self.rows = self.rows[:n]
        if not self.rows:
            self.col = 0
        return order[:n]

    def _move(self, src: int, dst: int) -> None:
        start = self.rows[src].start
        for keys, values in zip(self.cache.keys, self.cache.values):
            keys[dst, :, start : self.col] = keys[src, :, start : self.col]
            values[dst, :, start : self.col] = values[src, :, start : self.col]
        self.mask[dst] = self.mask[src]
        self.positions[dst] = self.positions[src]

    def _shift(self, by: int) -> None:
        """Move every live row's columns left by `by` (right when negative). Every row's columns run
        unbroken up to `col`, so one move fits all; left, `by` is the free space before the oldest."""
        if by == 0 or not self.rows:
            raise ChatloraError(f"a row outgrew the decode cache ({self.columns} columns)")
        n, lo, end = self.live, min(r.start for r in self.rows), self.col
        with torch.inference_mode():
            for keys, values in zip(self.cache.keys, self.cache.values):
                keys[:n, :, lo - by : end - by] = keys[:n, :, lo:end].clone()
                values[:n, :, lo - by : end - by] = values[:n, :, lo:end].clone()
            mask = self.mask[:n, :, :, lo:end].clone()
            self.mask[:n] = self.blocked
            self.mask[:n, :, :, lo - by : end - by] = mask
        for r in self.rows:
            r.start -= by
        self.col -= by


@torch.inference_mode()
def reference(model, steps: int = 8) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """The model's own forward, with transformers' growing cache, on a probe prompt and `steps` greedy
    tokens: (prompt, tokens fed, float32 logits after the prompt and after each token)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    vocab = base(model).get_input_embeddings().weight.shape[0]
    prompt = [(17 * i + 3) % vocab for i in range(16)]
    cache = {cache_keyword(model): DynamicCache()}
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, **cache)
    expected, tokens = [out.logits[0, -1].float()], []
    for _ in range(steps):
        tokens.append(int(expected[-1].argmax()))
        out = model(input_ids=torch.tensor([tokens[-1:]], device=device), use_cache=True, **cache)
        expected.append(out.logits[0, -1].float())
    return prompt, tokens, expected


@torch.inference_mode()
def parity(decoder: StaticDecoder, expected: tuple | None = None) -> float:
    """Largest logit difference, relative to the largest logit, between the decoder and `expected`
    (`reference(model)`, by default of the decoder's model as it is now), the same tokens fed to
    both. Runs with no live rows (it uses row 0)."""
    prompt, tokens, logits = expected or reference(decoder.model)
    decoder.reset()
    got = [decoder.add(prompt)] + [decoder.step([token])[0] for token in tokens]
    decoder.reset()
    scale = max(float(e.abs().max()) for e in logits) or 1.0
    return max(float((e - g).abs().max()) for e, g in zip(logits, got)) / scale


def fast_decoder(model, mode: str, slots: int = 1, columns: int = 4096, echo=log.info, warm: bool = True) -> StaticDecoder | None:
    """The fast path for `model` in `mode` (see MODES), checked against the model's own forward and
    (`warm`) with its graphs recorded; None for eager mode, or (with a message through `echo`) when
    the model or the check rules it out. Raises ChatloraError for a mode the device cannot run."""
    import time

    device = next(model.parameters()).device
    mode = resolve_mode(mode, device)
    if mode == "eager":
        return None
    why = unsupported(model)
    if why:
        echo(f"decode: eager (the static cache does not support {why})")
        return None
    context = getattr(base(model).config, "max_position_embeddings", None) or columns
    columns = plan_columns(model, slots, min(columns, context))
    started = time.perf_counter()
    # A wrong answer fast is worse than a right one slow: the fast path is compared with the model's
    # own forward as loaded, before projections are fused (fusing relies on the forward's call order).
    expected = reference(model)
    if mode == "compile":  # the check below runs the compiled step first: tell why nothing happens for a while
        echo(f"decode: compiling the decode step with torch.compile (about 2 minutes for a 7B model at the first "
             f"start on this GPU and torch; later starts read the kernels from {inductor_cache()})")
    fused, undo = fuse_projections(model)
    decoder = StaticDecoder(model, slots, columns, mode)
    diff = parity(decoder, expected)
    # bf16 rounding over 30-odd layers moves logits by a few percent of their scale; a wrong mask or
    # position moves them by all of it.
    limit = 1e-3 if decoder.dtype == torch.float32 else 0.1
    if fused and not diff <= limit:
        undo()  # perhaps the fusing: try once more without it
        fused, decoder = 0, StaticDecoder(model, slots, columns, mode)
        diff = parity(decoder, expected)
    if not diff <= limit:
        echo(f"decode: eager (the {mode} path's logits differ from the model's by {diff:.2g} of their scale, "
             f"more than {limit:g})")
        return None
    recorded = decoder.warm_up() if warm else 0
    echo(f"decode: {mode}, static cache of {slots} x {columns} tokens, checked"
         + (f", {fused} projection groups fused" if fused else "")
         + (f", {recorded} graphs recorded" if warm else "") + f" in {time.perf_counter() - started:.1f} s")
    return decoder
