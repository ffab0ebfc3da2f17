"""CPU time of Trainer's per-step bookkeeping on a 7B-shaped LoRA model: the full walks against
trainer/speed/walks.py's lists made once.

    python bench/step_overhead.py

The model has the Qwen1.5-7B architecture's structure (32 decoder layers, LoRA r=8 on its 7
projections: 448 trained tensors among 2,665 modules) with tiny widths, so it runs anywhere and
times only what depends on the structure: walking modules and parameters in Python. Each line is the
mean over --repeat calls, in milliseconds of this machine's CPU. A step with one forward pass makes
each call once (the input-casting switch: once per pass).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import architectures
import torch

# The Qwen1.5-7B architecture's 32 layers and projections, at widths that time only the walks.
SHAPED_7B = dict(architectures.QWEN15_7B, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512)


def model_7b_shaped():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**SHAPED_7B))
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def ms(fn: Callable[[], object], repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=50)
    a = p.parse_args()
    from accelerate import Accelerator
    from peft.helpers import disable_input_dtype_casting

    from chatlora.trainer import overrides
    from chatlora.trainer.speed import walks
    from chatlora.trainer.speed.grads import all_finite, local_grads

    torch.manual_seed(0)
    model = model_7b_shaped()
    trained = walks.trainable(model)
    modules = sum(1 for _ in model.modules())
    print(f"model: {modules:,} modules, {sum(1 for _ in model.parameters()):,} parameters, {len(trained)} trained")
    for p in trained:
        p.grad = torch.randn_like(p)
    accelerator = Accelerator(cpu=True)
    batch = {"input_ids": torch.ones(1, 1056, dtype=torch.long)}
    layers = walks.tuner_layers(model)
    per_token = walks.flops_per_token(model)

    def clip_then_guard(params):
        norm = accelerator.clip_grad_norm_(params, 1.0)
        return norm, all_finite(local_grads([p for p in model.parameters() if p.grad is not None]))

    def clip_and_reuse():
        return accelerator.clip_grad_norm_(trained, 1.0).isfinite()

    def with_casting(helper):
        with helper:
            pass

    # The full walks, kept before walks.py puts its shortcuts on the model.
    walk_train, walk_zero = model.train, model.zero_grad
    assert overrides.skip_unchanged_train(model)
    overrides.zero_trained_grads_only(model, trained)
    grads = [p.grad for p in trained]

    def zero_then_restore(zero):  # set_to_none drops the gradients: put back, so every call has work
        zero()
        for p, g in zip(trained, grads):
            p.grad = g

    rows = [
        ("model.train()", lambda: walk_train(), lambda: model.train()),
        ("FLOP count", lambda: 6 * batch["input_ids"].numel() * model.num_parameters(exclude_embeddings=True),
         lambda: per_token * batch["input_ids"].numel()),
        ("clip + non-finite guard", lambda: clip_then_guard(model.parameters()), clip_and_reuse),
        ("peft's input-casting switch", lambda: with_casting(disable_input_dtype_casting(model)),
         lambda: with_casting(walks.no_input_casting(layers))),
        ("zero_grad()", lambda: zero_then_restore(walk_zero), lambda: zero_then_restore(model.zero_grad)),
    ]
    print(f"{'per step':30s} {'full walks':>10s} {'walks.py':>10s}   (ms of CPU, mean of {a.repeat})")
    before = after = 0.0
    for name, old, new in rows:
        b, n = ms(old, a.repeat), ms(new, a.repeat)
        before, after = before + b, after + n
        print(f"{name:30s} {b:10.2f} {n:10.2f}")
    print(f"{'total':30s} {before:10.2f} {after:10.2f}")


if __name__ == "__main__":
    main()
