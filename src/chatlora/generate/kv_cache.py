"""The static decoder's KV cache (generate/decode.py) and what it needs to know of a model: how many
layers, key and value heads and widths, which layers attend through a sliding window, and whether
the cache can serve the model at all.

What a layer caches is the layer's business: heads x head_dim keys and values for most models, but
multi-head latent attention (DeepSeek-V2/V3) caches other shapes, and which ones differs between
transformers releases (each head's expanded keys and values, or the compressed latent and the
rotary part, one "head" each). So each layer's cache takes the shape of what the layer first hands
to `update`, at the first prompt's prefill (StaticDecoder makes one at its start).
"""

from __future__ import annotations

import inspect

import torch

from chatlora.errors import ChatloraError

# Layer types (config.layer_types) the static cache can mask: every other kind (chunked attention,
# linear attention, state-space layers) keeps state the cache does not hold.
MASKABLE = ("full_attention", "sliding_attention")


def base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def text_config(model):
    config = base(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def unsupported(model) -> str | None:
    """Why the static cache cannot decode this model (None: it can), naming the model type. Layers
    of full and of sliding-window attention are masked (see window()); any other kind of layer keeps
    state the cache does not hold; models that are not plain decoder stacks have no
    `num_hidden_layers`; a model whose code ships with it may call the cache in other ways."""
    config = text_config(model)
    kind = getattr(config, "model_type", None) or "this model"
    if not hasattr(config, "num_hidden_layers"):
        return f"{kind}: the model config has no num_hidden_layers"
    if type(base(model)).__module__.startswith("transformers_modules"):
        return f"{kind}: its code ships with the model (trust_remote_code) and was never checked with this cache"
    other = sorted(set(getattr(config, "layer_types", None) or ()) - set(MASKABLE))
    if other:
        return f"{kind}: layers of type {other}"
    return None


def window(model) -> tuple[int | None, bool]:
    """(the sliding window in tokens, or None when no layer has one; whether some layers attend to
    every earlier token as well). A layer of sliding-window attention at position q sees the keys
    at positions above q - window (transformers' sliding_window_overlay)."""
    config = text_config(model)
    types = getattr(config, "layer_types", None)
    size = getattr(config, "sliding_window", None)
    if types is not None:
        return (size, "full_attention" in types) if "sliding_attention" in types and size else (None, True)
    # No layer types (Mistral, Mixtral, Phi-3): the model masks every layer with the window, if any.
    if size and getattr(config, "use_sliding_window", True):
        return size, False
    return None, True


def cache_keyword(model) -> str:
    """The name of the KV cache argument of the model's forward, for every cache chatlora hands in
    (the static one here, transformers' DynamicCache in generate/rows.py). transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns); the GPU
    image's 5.17 knows only the old one."""
    return "cache" if "cache" in inspect.signature(type(base(model)).forward).parameters else "past_key_values"


def bytes_per_column(model, slots: int) -> int:
    """Cache bytes per column of `slots` rows, from the config: heads x head_dim keys and values (for
    latent attention each head's expanded keys and values, the most any transformers release keeps)."""
    config = text_config(model)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    widths = 2 * (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    if getattr(config, "kv_lora_rank", None):
        widths = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    itemsize = base(model).get_input_embeddings().weight.dtype.itemsize
    return config.num_hidden_layers * widths * itemsize * slots


class SlotCache:
    """Keys and values of `slots` rows x `columns` positions per layer, written in place.

    Quacks like a transformers Cache where the model's forward touches one: attention layers call
    `update` (5.17 passes cache_kwargs positionally, 5.24 as `kwargs=`; neither is needed here).
    """

    is_compileable = True

    def __init__(self, layers: int, slots: int, columns: int, device):
        self.slots, self.columns = slots, columns
        self.keys: list[torch.Tensor] = [None] * layers  # type: ignore[list-item] - each made at its first update
        self.values: list[torch.Tensor] = [None] * layers  # type: ignore[list-item]
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        """Where a decode step writes (a tensor, so a recorded graph reads the current value)."""
        self.batch, self.width = slots, columns
        """The rows and columns the next decode step attends over (the bucket)."""
        self.prefill: tuple[int, int] | None = None
        """(row, first column) while one row's prompt is prefilled."""

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.prefill is not None:
            # A prompt attends only to itself: store it, hand the fresh keys back.
            if self.keys[layer_idx] is None:
                for cache, states in ((self.keys, key_states), (self.values, value_states)):
                    cache[layer_idx] = states.new_zeros(self.slots, states.shape[1], self.columns, states.shape[-1])
            row, start = self.prefill
            end = start + key_states.shape[2]
            self.keys[layer_idx][row, :, start:end] = key_states[0]
            self.values[layer_idx][row, :, start:end] = value_states[0]
            return key_states, value_states
        keys = self.keys[layer_idx][: self.batch, :, : self.width]
        values = self.values[layer_idx][: self.batch, :, : self.width]
        keys.index_copy_(2, self.column, key_states)
        values.index_copy_(2, self.column, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # only asked when no position ids are given, and they always are

    def __len__(self) -> int:
        return len(self.keys)


def buckets(limit: int, start: int) -> list[int]:
    """Powers of two from `start` below `limit`, then `limit`: each one is a recorded graph."""
    out, size = [], start
    while size < limit:
        out.append(size)
        size *= 2
    return out + [limit]


def plan_columns(model, slots: int, want: int, memory_share: float = 0.5) -> int:
    """Cache columns per row: `want`, or fewer so that the cache takes at most `memory_share` of the
    free GPU memory. Raises ChatloraError when not even 256 columns fit."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return want
    per_column = bytes_per_column(model, slots)
    free = torch.cuda.mem_get_info(device)[0]
    fits = int(free * memory_share // per_column) // 64 * 64
    if fits < min(want, 256):
        raise ChatloraError(f"the KV cache for {slots} rows does not fit in the GPU's free memory ({free / 2**30:.1f} GiB): "
                            f"lower --max-batch")
    return min(want, fits)
