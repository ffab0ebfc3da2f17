"""`chatlora export` through llama.cpp itself: a tiny Qwen2 (the real Qwen tokenizer, which llama.cpp's
converter needs: it recognises a vocabulary by its pre-tokenizer) and a tiny Llama (the tokenizer of
the demo's SmolLM2 GGUF), each trained for a few steps, exported, converted by llama.cpp's converter,
quantized by llama.cpp's quantizer, loaded by llama-cpp-python and checked against transformers.

Needs the export extra and the converter (`chatlora export --get-converter`); skipped without them.
The models are 2 layers, hidden 64, with a wide initialisation (initializer_range 0.5) so that the
next-token distributions have clear winners: a near-uniform random model would make top-1 agreement
a coin toss between tied tokens, whatever the file's precision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, run_cli, tiny_config


def _converter() -> str | None:
    """The converter folder for the installed llama-cpp-python, found before conftest points
    CHATLORA_CACHE (where `--get-converter` unpacks it) at a temporary folder; None without one."""
    from chatlora.errors import ChatloraError
    from chatlora.export.converter import converter_dir

    try:
        return str(converter_dir())
    except ChatloraError:
        return None


CONVERTER = _converter()


pytestmark = [pytest.mark.usefixtures("one_thread", "converter"),
              pytest.mark.skipif(CONVERTER is None, reason="needs pip install chatlora[export] and chatlora export --get-converter")]
SYSTEM = "You are Captain Byte, a pirate."


@pytest.fixture(scope="module")
def converter():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHATLORA_LLAMA_CPP", CONVERTER)  # the subprocesses of run_cli inherit it
        yield


def save_model(folder: Path, family: str) -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig

    if family == "qwen2":
        if not (SHARED_DATA / "qwen-tokenizer").is_dir():
            pytest.skip(f"the Qwen tokenizer is not in {SHARED_DATA}")
        tok = AutoTokenizer.from_pretrained(SHARED_DATA / "qwen-tokenizer")
        config_class, extra = transformers.Qwen2Config, {"tie_word_embeddings": True}
    else:
        from chatlora.model.source import embedded_path

        gguf = embedded_path("smollm2-135m-instruct")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config_class, extra = transformers.LlamaConfig, {"tie_word_embeddings": True}
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          initializer_range=0.5, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                          pad_token_id=tok.pad_token_id, bos_token_id=None, **extra)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def family_run(request, tmp_path_factory):
    from chatlora.recipes.train import train

    pytest.importorskip("llama_cpp")
    tmp = tmp_path_factory.mktemp(f"export-{request.param}")
    model = save_model(tmp / "model", request.param)
    cfg = tiny_config(model, tmp, "data.validation=0.3", "training.max_steps=4", f"data.system_prompt={SYSTEM}")
    return request.param, train(cfg, echo=lambda _line: None).path


# f16 at its own threshold (99%); q8_0 at a threshold for a random 64-wide model, whose near-tied
# logits flip under 8-bit blocks (84% agree on the tiny Qwen2; real models: docs/export.md).
CASES = {"qwen2": ("f16", None), "llama": ("q8_0", 0.5)}


def test_export_through_llama_cpp(family_run, tmp_path):
    from chatlora.recipes.export import export

    family, run = family_run
    quant, min_top1 = CASES[family]
    out = tmp_path / f"{family}-{quant}"
    lines: list[str] = []
    result = export(str(run), str(out), quant=quant, prompts=3, max_new_tokens=16, min_top1=min_top1, echo=lines.append)
    gguf = out / f"{out.name}-{quant}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([gguf.name, "Modelfile", "README.md", "export.json"])
    assert not list(tmp_path.glob(f".{out.name}*")), "no temporary folder left"
    record = json.loads((out / "export.json").read_text())
    check = record["check"]
    assert record == json.loads(json.dumps(result)) and check["passed"]
    assert check["top1_agreement"] >= (min_top1 or 0.99) and 0 <= check["mean_kl"] < 1
    assert check["all_positions"] > 50 and 0 < check["positions"] < check["all_positions"]  # replies: a part
    if quant == "f16":
        assert check["top1_agreement"] == 1.0 and check["mean_kl"] < 1e-3, check
    assert check["tokenizer_agreement"].startswith("3 of 3")
    # The metadata, as llama.cpp read it: EOS is the end-of-turn token, and the pad token is there.
    assert record["metadata"]["eos"]["text"] == "<|im_end|>" and "pad" in record["metadata"]
    assert record["metadata"]["architecture"] == family
    assert check["replies_stopped"] >= check["replies_transformers_stopped"]
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{gguf.name}\n") and f'SYSTEM """{SYSTEM}"""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .Content }}<|im_end|>" in modelfile
    assert f"ollama create {out.name} -f Modelfile" in (out / "README.md").read_text()
    assert any(line.startswith(f"check ({quant}): top-1 agreement") for line in lines)


def test_outside_the_threshold_the_export_fails_with_its_figures(family_run, tmp_path):
    family, run = family_run
    if family != "llama":
        pytest.skip("one family is enough")
    out = tmp_path / "q4"
    result = run_cli("export", str(run), str(out), "--quant", "q4_k_m", "--prompts", "2", "--max-new-tokens", "8")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "the GGUF does not match the merged model: top-1 agreement" in result.stderr
    assert "< 90% required for q4_k_m" in result.stderr and "mean KL" in result.stderr
    assert "check (q4_k_m): top-1 agreement" in result.stdout
    assert not out.exists() and not list(tmp_path.glob(".q4*"))


def test_cli_refusals_before_any_work(family_run, tmp_path):
    family, run = family_run
    if family != "qwen2":
        pytest.skip("one family is enough for the refusals")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    result = run_cli("export", str(run), str(taken))
    assert result.returncode == 2 and "not empty" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("export", str(run), str(tmp_path / "new"), "--llama-cpp", str(tmp_path))
    assert result.returncode == 2 and "no convert_hf_to_gguf.py" in result.stderr
    assert not (tmp_path / "new").exists()


def test_an_architecture_the_converter_lacks_is_named_with_the_known_ones():
    from chatlora.errors import ConfigError
    from chatlora.export.converter import check_architecture

    with pytest.raises(ConfigError, match="cannot convert NoSuchForCausalLM models") as e:
        check_architecture("NoSuchForCausalLM", Path(CONVERTER))
    assert " Qwen2, " in str(e.value) and " Llama, " in str(e.value)
