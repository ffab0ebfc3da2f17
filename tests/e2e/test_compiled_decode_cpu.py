"""`--decode compile` on the CPU, the whole toolchain (inductor writes C++ and compiles it): the compiled
step gives the model's own logits, and dynamo traces it once. A second trace of the same step (a
"restart") was most of a warm start's time on an H100: with symbolic floats, inductor's scalar pass
threw the first trace away after AOTAutograd (model/layers.py, `compile_settings`). CUDA graphs over
this step: tests/gpu/test_compiled_decode.py."""

from __future__ import annotations

import torch

from chatlora.generate.decode import StaticDecoder, parity


def test_the_compiled_decode_step_is_the_model_and_is_traced_once(tiny_model_dir, tmp_path, monkeypatch):
    import torch._dynamo as dynamo
    from torch._dynamo.utils import clear_compilation_metrics, get_compilation_metrics
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    dynamo.reset()
    clear_compilation_metrics()  # dynamo.reset() keeps the record of earlier compiles
    decoder = StaticDecoder(model, slots=2, columns=256, mode="compile")
    assert parity(decoder) < 1e-4
    steps = [m for m in get_compilation_metrics() if m.co_name == "_eager_forward"]
    assert steps, "the decode step was not compiled"
    assert all(not m.restart_reasons for m in steps), [m.restart_reasons for m in steps]
    assert any((tmp_path / "inductor").iterdir()), "the kernels did not go to the cache folder"
    dynamo.reset()
