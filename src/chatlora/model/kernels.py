"""Liger's fused Triton kernels for a model's RMSNorm, RoPE and SwiGLU (`model.kernels=liger`).

Why: with CUDA graphs the recipe's step is its GPU kernels, and a third of their time is thousands
of small elementwise kernels (eager RMSNorm alone is about 8 a call). Liger (PyPI `liger-kernel`)
does each of these in one kernel a direction, with nothing to compile; what that saves per step of
the recipe, on which card, is measured in docs/benchmarks.md ("the library's model.kernels=liger").

Liger patches transformers' code for the model's architecture, so it is applied before the model is
built and holds for the rest of the process. Which of its kernels fit an architecture, Liger's own
defaults say: GeGLU rather than SwiGLU for Gemma, no RoPE kernel for GLM-4 (which refuses it) or
DeepSeek (its interleaved partial RoPE), so they are kept as they are. The output layer and the loss
stay chatlora's (only the trained positions, in chunks): Liger's fused cross-entropy is left off.
"""

from __future__ import annotations

import importlib.util
import inspect

# Liger's loss kernels, turned off: chatlora's loss is leaner.
LOSSES = ("cross_entropy", "fused_linear_cross_entropy")
# The order its other kernels are named in.
KERNELS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu")


def why_not_liger(on_gpu: bool, compile_layers: bool) -> str | None:
    """Why Liger's kernels cannot be used here, or None."""
    if not on_gpu:
        return "it needs a CUDA GPU"
    if compile_layers:
        return "model.compile=layers fuses these kernels already"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'chatlora[liger]')"
    return None


def use_liger(model_type: str, on_gpu: bool, compile_layers: bool, asked: str = "liger") -> str | None:
    """Patch transformers' code for `model_type` with Liger's kernels, before the model is built.

    `asked` is model.kernels: `liger` returns a note saying why nothing was patched, when nothing
    can be; `auto` patches where Liger can and otherwise returns None (the model's own code, as
    asked for by default), or a line when liger-kernel is merely missing on a GPU, since installing
    it is the fix. Returns the line to print: what was replaced, or that note."""
    why = why_not_liger(on_gpu, compile_layers)
    if why is None:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
        if apply is None:
            why = f"Liger has no kernels for model type {model_type!r}"
        else:
            params = inspect.signature(apply).parameters
            apply(**{name: False for name in LOSSES if name in params})
            fused = sorted((name for name, p in params.items() if p.default is True and name not in LOSSES),
                           key=lambda name: KERNELS.index(name) if name in KERNELS else len(KERNELS))
            return f"kernels: Liger's {', '.join(fused)} for {model_type}"
    if asked == "auto":
        return f"kernels: the model's own ({why})" if on_gpu and not compile_layers else None
    return f"note: model.kernels=liger ignored: {why}"
