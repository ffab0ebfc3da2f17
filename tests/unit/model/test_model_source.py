"""Model sources: local folder, GGUF file, hub id, ModelScope id, the embedded default."""

from __future__ import annotations

import importlib.util

import pytest

from chatlora.config.schema import ModelConfig
from chatlora.errors import ModelError
from chatlora.model.load import load_tokenizer
from chatlora.model.source import resolve


def test_local_folder(tiny_model_dir):
    source = resolve(ModelConfig(name=str(tiny_model_dir)))
    assert (source.kind, source.path, source.gguf_file) == ("local", str(tiny_model_dir), None)
    tok = load_tokenizer(source, ModelConfig(name=str(tiny_model_dir)))
    assert tok.eos_token == "<|im_end|>"


def test_hub_ids_and_missing_paths():
    assert resolve(ModelConfig(name="Qwen/Qwen1.5-7B-Chat")).kind == "hf"
    assert resolve(ModelConfig(name="Qwen/Qwen1.5-7B-Chat", revision="v1")).kwargs() == {"revision": "v1"}
    with pytest.raises(ModelError, match="no such folder or file"):
        resolve(ModelConfig(name="./not/here"))
    with pytest.raises(ModelError, match="no such folder or file"):
        resolve(ModelConfig(name="/abs/missing", source="local"))


def test_hub_download_failure_is_a_clear_error(monkeypatch):
    """The real hub code path runs; with no network (or HF_HUB_OFFLINE) it fails with advice, no traceback."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: without this the hub is tried with retries
    # (about 45 s on a machine with no network) before the same error comes.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = ModelConfig(name="Qwen/Qwen1.5-7B-Chat")
    with pytest.raises(ModelError, match="from the Hugging Face hub.*local folder"):
        load_tokenizer(resolve(cfg), cfg)


def test_modelscope_ids_use_modelscope():
    cfg = ModelConfig(name="modelscope:qwen/Qwen1.5-7B-Chat")
    if importlib.util.find_spec("modelscope") is None:
        with pytest.raises(ModelError, match=r"pip install 'chatlora\[modelscope\]'"):
            resolve(cfg)
    else:  # installed but no network here: the download itself must fail cleanly
        with pytest.raises(ModelError, match="could not download"):
            resolve(cfg)


