"""Attention for packed rows on GPU: torch's variable-length flash attention, registered with
transformers' AttentionInterface so every model that uses the interface gets it.

A packed row holds several samples back to back. transformers' default answer to that (restarting
position_ids under sdpa) builds a dense T x T block mask, which rules out the flash kernels and costs
memory quadratic in the row. `varlen_attn` takes the sample boundaries (cumulative lengths) instead:
each sample attends only to itself, at flash speed, with no mask at all.

What the kernel does not do, chatlora does not ask of it: a model whose attention soft-caps its
logits (Gemma 2) keeps transformers' own attention and trains on padded batches (`unsupported`,
`packing_problem`); sliding-window layers (Gemma 2/3, Mistral v0.1) pass their window to the kernel;
values narrower than keys (DeepSeek's latent attention) are padded to the keys' width, as
transformers does for flash attention.
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
def _windowed() -> bool:
    """The causal argument changed between torch releases: `is_causal=True` (2.10) or a window
    (later), which also takes a sliding window."""
    return "window_size" in inspect.signature(_varlen()).parameters


def _causal_kwargs(sliding_window: int | None = None) -> dict:
    if not _windowed():
        return {"is_causal": True}
    # transformers' sliding window of W: position q sees keys above q - W, i.e. W - 1 to its left.
    return {"window_size": (-1 if sliding_window is None else sliding_window - 1, 0)}


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def packing_problem(config) -> str | None:
    """Why packed rows are refused for this model (None: they are not). Soft-capped attention logits
    are computed by transformers' eager attention alone, which for a packed row would hold a dense
    row x row attention matrix per layer: padded batches hold far less."""
    if getattr(_text(config), "attn_logit_softcapping", None):
        return "attention logit soft-capping is not supported by varlen attention"
    return None


def has_sliding_window(config) -> bool:
    """Whether some of the model's layers attend through a sliding window (Gemma 2 and 3, Mistral v0.1,
    Phi-3)."""
    text = _text(config)
    return bool(getattr(text, "sliding_window", None)) and ("sliding_attention" in (getattr(text, "layer_types", None) or ())
                                                           or getattr(text, "use_sliding_window", True))


def unsupported(config) -> str | None:
    """Why varlen attention would not compute this model's attention exactly (None: it would);
    such a model keeps transformers' own attention."""
    why = packing_problem(config)
    if why is None and _varlen() is not None and not _windowed() and has_sliding_window(config):
        why = "this torch's varlen attention has no sliding window (torch 2.11 or later has)"
    return why


def available() -> bool:
    """varlen attention needs torch >= 2.10 and a CUDA device (it is a flash-attention kernel)."""
    return _varlen() is not None and torch.cuda.is_available()


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, Hkv, T, D] → [B, T, Hq, D].

    Packed rows come with `cu_seq_lens_q` (from chatlora's PackCollator). Rows whose pairs share
    their prompt (data/collate.py pack_shared) also bring `kv_index`, which gathers each segment's keys
    (the prompt's, then its own), and `cu_seq_lens_k` / `max_length_k` for them. Anything else (a
    padded batch, decoding with a cache) goes to sdpa, which handles masks (sliding windows included)
    and caches.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap:  # load_model never picks this attention for such a model (unsupported())
        raise ValueError("varlen attention cannot soft-cap attention logits")
    cu = kwargs.get("cu_seq_lens_q")
    kv_index = kwargs.get("kv_index")
    if cu is None or attention_mask is not None or query.shape[2] != key.shape[2] or query.dtype == torch.float32:
        if kv_index is not None:  # sdpa would let every token of the row see the prompts' and replies' keys alike
            raise ValueError("a row of shared prompts needs the varlen kernel (16-bit weights, packed row, no mask)")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if sliding_window is not None and not _windowed():
        raise ValueError("this torch's varlen attention has no sliding window")
    batch, heads, length, dim = query.shape
    max_len = kwargs["max_length_q"]
    cu_k, max_k = cu, max_len
    if kv_index is not None:
        key, value = key[:, :, kv_index], value[:, :, kv_index]
        cu_k, max_k = kwargs["cu_seq_lens_k"], kwargs["max_length_k"]
    groups = heads // key.shape[1]
    if groups > 1:  # grouped-query attention: share each kv head across its query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    # The kernel takes one head width: latent attention's narrower values are padded with zeros (or
    # queries and keys, whose dot products zeros leave as they are, were values the wider).
    scaling = dim**-0.5 if scaling is None else scaling
    value_dim = value.shape[-1]
    width = max(dim, value_dim)
    q, k, v = (t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))
               for t in (query, key, value))
    q, k, v = (t.transpose(1, 2).reshape(-1, heads, width) for t in (q, k, v))
    max_len, max_k = (int(m) if torch.is_tensor(m) else m for m in (max_len, max_k))
    # (A plain int is passed on as it is: under torch.compile it is a symbolic size, where int() would
    # make every new longest sample a recompile.) Causal from the bottom right: a query segment
    # shorter than its keys (a reply after its shared prompt) sees all the keys before its own.
    out = _varlen()(q, k, v, cu.to(torch.int32), cu_k.to(torch.int32), max_len, max_k, scale=scaling,
                    **_causal_kwargs(sliding_window))
    return out.reshape(batch, length, heads, width)[..., :value_dim], None


def varlen_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed rows (the sample boundaries reach the kernel as cu_seq_lens, so the dense
    block mask is never built); sdpa's mask for everything else, which goes to sdpa: padded batches,
    and single sequences, whose sliding-window layers need the window as a mask. transformers marks
    packed rows (found from their position_ids) by not letting sdpa skip the mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and not kwargs.get("allow_is_causal_skip", True):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Register the attention function and its mask rule with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)
    return NAME
