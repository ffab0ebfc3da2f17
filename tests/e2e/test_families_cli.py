"""A model whose code ships with it (not in transformers) is refused by name, in process and through
the real command line."""

from __future__ import annotations

import pytest


def test_a_model_whose_code_ships_with_it_is_refused_by_name(tmp_path):
    """InternLM2 is not in transformers: its config.json maps its classes to .py files of its own."""
    import json

    from chatlora.config.schema import ModelConfig
    from chatlora.errors import ModelError
    from chatlora.model.source import resolve
    from conftest import FIXTURES, build_byte_tokenizer, run_cli

    folder = tmp_path / "internlm2"
    folder.mkdir()
    build_byte_tokenizer().save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 32,
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}))
    result = run_cli("train", "demo", f"model.name={folder}", f"data.train={FIXTURES / 'alpaca.json'}",
                     f"output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("InternLM2ForCausalLM (model_type 'internlm2') is not an architecture transformers includes; it is defined "
            "by code shipped with the model (configuration_internlm2.py, modeling_internlm2.py), which chatlora runs "
            "only with model.trust_remote_code=true") in result.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(ModelError, match=r"configuration_internlm2.py, modeling_internlm2.py \(named by auto_map in "
                                         r"config.json\) are not in the folder"):
        resolve(ModelConfig(name=str(folder), trust_remote_code=True))
    (folder / "config.json").write_text(json.dumps({"model_type": "internlm9"}))
    with pytest.raises(ModelError, match="'internlm9'.* is not an architecture transformers .* includes, and the folder ships no code"):
        resolve(ModelConfig(name=str(folder)))
