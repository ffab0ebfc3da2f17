"""Load the tokenizer, generation config and base model from a resolved `Source`."""

from __future__ import annotations

import copy
import json
import logging
import zipfile
from functools import lru_cache
from pathlib import Path

import torch

from chatlora.config.schema import ModelConfig
from chatlora.model import attention, gguf_cache, quant
from chatlora.errors import ModelError
from chatlora.model.source import Source

log = logging.getLogger(__name__)

# Tokens tried, in order, as a pad token when the tokenizer has none or pads with its end-of-turn
# token (a collator that masks pad ids would then never train the model to stop).
PAD_CANDIDATES = ("<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")


def _hub_error(source: Source, what: str, e: Exception) -> ModelError:
    if source.kind == "hf":
        return ModelError(
            f"could not load the {what} of {source.path!r} from the Hugging Face hub ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0]}). Check the id and your network, or download it and pass the local folder."
        )
    return ModelError(f"could not load the {what} from {source.path!r}: {str(e).splitlines()[0]}")


def unreadable(path: Path) -> str | None:
    """Why a JSON, safetensors or torch file cannot be read, or None when it can (or is of another
    kind). What a file cut short (a full disk, a killed copy or download), emptied or overwritten
    gives; only headers and indexes are read, not the tensors, so a large file costs little."""
    from safetensors import SafetensorError, safe_open

    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text("utf-8"))
            if not isinstance(data, dict):
                kind = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}.get(type(data), "a number")
                return f"it holds {kind}, not a JSON object"
        elif path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):  # checks the header against the file's length
                pass
        elif path.suffix in (".pt", ".pth", ".bin"):
            # torch.save writes a zip archive; its index is at the end, so a file cut short has none.
            with zipfile.ZipFile(path):
                pass
    except zipfile.BadZipFile:
        return "not a complete torch file"
    except (OSError, ValueError, SafetensorError) as e:  # ValueError: bad JSON, or bytes that are not UTF-8
        return f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def _damaged_weights(source: Source, e: Exception) -> ModelError:
    """A base model whose weights file is damaged, naming the file where it is a local one."""
    folder = Path(source.path)
    bad = next((f for f in sorted(folder.glob("*.safetensors")) if unreadable(f)), None) if folder.is_dir() else None
    what = f"the weights file {bad}" if bad else f"a weights file of {source.path!r}"
    return ModelError(f"{what} is damaged ({e.__class__.__name__}: {str(e).splitlines()[0]}), cut short by an "
                      "interrupted download or copy, say; download or copy the model again")


def load_tokenizer(source: Source, cfg: ModelConfig):
    """The tokenizer; raises ModelError when it cannot be found."""
    from transformers import AutoTokenizer

    try:
        folder = gguf_cache.header(source, cfg.trust_remote_code)
        return AutoTokenizer.from_pretrained(folder.path, trust_remote_code=cfg.trust_remote_code, **folder.kwargs())
    except (OSError, ValueError) as e:
        raise _hub_error(source, "tokenizer", e) from None


def fix_pad_token(tokenizer, end_of_turn: int | None) -> str | None:
    """Give the tokenizer a pad token that is not its end-of-turn or eos token.

    Returns a note saying what was changed, or None. Padding is masked by attention and labels, so
    any token the model already has will do; a new token is added only when no candidate exists.
    """
    avoid = {end_of_turn, tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in avoid:
        return None
    old = tokenizer.pad_token
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and vocab[token] not in avoid:
            tokenizer.pad_token = token
            break
    else:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    why = "had none" if old is None else f"padded with its end-of-turn token {old}"
    return f"tokenizer {why}; padding with {tokenizer.pad_token} (id {tokenizer.pad_token_id})"


@lru_cache(maxsize=4)
def _model_config(source: Source, trust_remote_code: bool):
    from transformers import AutoConfig

    folder = gguf_cache.header(source, trust_remote_code)
    return AutoConfig.from_pretrained(folder.path, trust_remote_code=trust_remote_code, **folder.kwargs())


def model_config(source: Source, cfg: ModelConfig):
    """The model's transformers config (config.json, or a GGUF file's header), read once per source:
    a GGUF header takes seconds to parse, and the generation config and the memory plan both need it.
    A copy, so a caller's changes stay its own. Raises what AutoConfig raises (OSError, ValueError)."""
    return copy.deepcopy(_model_config(source, cfg.trust_remote_code))


def load_generation_config(source: Source, cfg: ModelConfig, tokenizer):
    """The model's generation config (read without loading weights), plus `cfg.stop_tokens`."""
    from transformers import GenerationConfig

    try:
        folder = gguf_cache.header(source, cfg.trust_remote_code)
        gen = GenerationConfig.from_pretrained(folder.path, **folder.kwargs())
    except OSError:
        # GGUF files and some folders carry no generation_config.json: derive it as transformers does.
        try:
            config = model_config(source, cfg)
        except (OSError, ValueError) as e:
            raise _hub_error(source, "config", e) from None
        gen = GenerationConfig.from_model_config(config)
    return add_stop_tokens(gen, tokenizer, cfg.stop_tokens)


def stop_ids(gen) -> list[int]:
    eos = gen.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def add_stop_tokens(gen, tokenizer, tokens: list[str]):
    ids = stop_ids(gen)
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
            raise ModelError(f"model.stop_tokens: {token!r} is not a token of this tokenizer")
        if token_id not in ids:
            ids.append(token_id)
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    return gen


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def attention_for(config, dtype: torch.dtype, asked: str | None = None) -> str | None:
    """The attention implementation a model is built with: `asked` (model.attn_implementation) when set;
    else varlen attention where it runs (packed rows at flash speed; padded batches fall back to sdpa),
    eager for soft-capped attention logits (Gemma 2: sdpa and flash kernels would skip the cap), or
    None (transformers' default)."""
    if asked is None and attention.available() and dtype in (torch.bfloat16, torch.float16) and attention.unsupported(config) is None:
        return attention.register()
    if asked is None and attention.packing_problem(config):
        return "eager"
    return asked


def load_model(source: Source, cfg: ModelConfig, tokenizer, generation_config, device: str | None = None):
    """The base causal LM, in `cfg.dtype`, with the tokenizer's pad token and the checked stop tokens."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype)
    quantize = cfg.quantize == "nf4"
    if quantize and dtype == torch.float32:
        dtype = torch.bfloat16  # QLoRA computes in bf16; the unquantized parts stay in it too
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    try:
        attn = attention_for(model_config(source, cfg), dtype, cfg.attn_implementation)
        if attn:
            kwargs["attn_implementation"] = attn
        if cfg.random_init:
            config = model_config(source, cfg)
            with torch.device(device or "cpu"):
                model = AutoModelForCausalLM.from_config(config, **kwargs)
            if quantize:
                model = quant.quantize_in_place(model, dtype)
        else:
            if quantize:
                # Quantized shard by shard as it loads: the 16-bit model never exists on the GPU.
                kwargs["quantization_config"] = quant.nf4_config(dtype)
            folder = gguf_cache.weights(source, dtype, cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(folder.path, **kwargs, **folder.kwargs(),
                                                         device_map=device or ("cpu" if quantize else None))
    except (OSError, ValueError) as e:
        raise _hub_error(source, "model", e) from None
    except SafetensorError as e:
        raise _damaged_weights(source, e) from None
    if source.gguf_file:
        # transformers de-quantizes GGUF weights into plain tensors on load; the GGUF marker it leaves
        # would make Trainer and peft treat the model as quantized (and refuse to train or merge).
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # only when fix_pad_token had to add a token
    model.config.pad_token_id = tokenizer.pad_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config
    return model
