"""Attention for packed rows on GPU: torch's variable-length flash attention, registered with
transformers' AttentionInterface so every model that uses the interface gets it.

A packed row holds several samples back to back. transformers' default answer to that (restarting
position_ids under sdpa) builds a dense T x T block mask, which rules out the flash kernels and costs
memory quadratic in the row. `varlen_attn` takes the sample boundaries (cumulative lengths) instead:
each sample attends only to itself, at flash speed, with no mask at all.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

NAME = "chatlora_varlen"


@lru_cache(maxsize=1)
def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@lru_cache(maxsize=1)
def _causal_kwargs() -> dict:
    """The causal argument changed between torch releases: `is_causal=True` (2.10) or a window."""
    params = inspect.signature(_varlen()).parameters
    if "is_causal" in params:
        return {"is_causal": True}
    return {"window_size": (-1, 0)}


def available() -> bool:
    """varlen attention needs torch >= 2.10 and a CUDA device (it is a flash-attention kernel)."""
    return _varlen() is not None and torch.cuda.is_available()


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, T, D] → [B, T, Hq, D].

    Packed rows come with `cu_seq_lens_q` (from chatlora's PackCollator). Anything else (a padded
    batch, decoding with a cache) goes to sdpa, which handles masks and caches.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2] or query.dtype == torch.float32:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    if groups > 1:  # grouped-query attention: share each kv head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    q, k, v = (t.transpose(1, 2).reshape(batch * length, heads, dim) for t in (query, key, value))
    max_len = kwargs["max_length_q"]
    if torch.is_tensor(max_len):
        max_len = int(max_len)
    # (A plain int is passed on as it is: under torch.compile it is a symbolic size, where int() would
    # make every new longest sample a recompile.)
    out = _varlen()(q, k, v, cu.to(torch.int32), cu.to(torch.int32), max_len, max_len, scale=scaling, **_causal_kwargs())
    return out.reshape(batch, length, heads, dim), None


def varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed rows (the sample boundaries reach the kernel as cu_seq_lens, so the dense
    block mask is never built); sdpa's mask for padded batches, which go to sdpa."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register the attention function and its mask rule with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
    return NAME
