"""The decoder layers of a model, compiling them for training (`model.compile=layers`), and where
torch.compile keeps what it compiled and how it traces (`compile_settings`, for training and
`--decode compile`).

A LoRA training step on a 7B model is bound by the CPU issuing small kernels (about 15,000 a step):
per projection peft runs dropout, two small matmuls, a scale and an add; RMSNorm, RoPE and SwiGLU are
several elementwise kernels each. torch.compile fuses those. Compiling the whole model recompiles for
every new packed length and takes minutes (measured: 385 s of compiling in a 30-step run); compiling
one decoder layer with symbolic sizes compiles once, and every layer and every length reuses it
(the layers share their code; their weights are inputs of the compiled graph, not constants).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def decoder_layers(model) -> nn.ModuleList | None:
    """The model's stack of decoder layers: the longest ModuleList of modules of one class (found in
    any wrapper: peft, DDP), or None."""
    best = None
    for _name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    return best


def inductor_cache() -> Path:
    """Where torch.compile keeps its compiled kernels: `$TORCHINDUCTOR_CACHE_DIR` as the user set it,
    else chatlora's cache folder (also when the variable is set but empty). Inductor's own default is a folder under /tmp, which a reboot
    empties (and which inductor writes into the variable itself once it has used it, so that value
    counts as unset). Inductor keys each entry by the graph, the dtypes, the torch version and the
    GPU, so one folder serves every model and card."""
    import getpass
    import os
    import tempfile

    from chatlora.config.load import cache_root

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    torch_default = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
    if not current or Path(current) == torch_default:  # set but empty: inductor would write into the working folder
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def compile_settings() -> Path:
    """Set up torch.compile as both of chatlora's compiles want it; returns the kernel cache folder.

    - Kernels persist in chatlora's cache folder (`inductor_cache`).
    - Sizes that change (the packed length, the batch and length buckets) are symbolic from the start
      (`dynamic=True` at each compile), so they do not each cost a compile; a few specialisations
      (sizes 0 and 1) remain, hence the larger recompile limit.
    - Floats are constants (`specialize_float`). With `dynamic=True` dynamo otherwise traces every float
      attribute of the model (RMSNorm's epsilon, rotary scaling, the embedding's `norm_type`) as a
      symbolic input, inductor's scalar pass then fails on some of them and dynamo throws the whole
      trace away and traces again with them fixed. For the decode step that restart came after
      AOTAutograd: on an H100 the first of two attempts was 45 s of a 60 s second start
      (bench/LOG.md, 2026-12-08); on the CPU a tiny model's second start went from 5.6 s to 3.5 s.
    """
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
    dynamo.config.specialize_float = True
    return inductor_cache()


def compile_layers(model) -> int:
    """Compile each decoder layer in place (lazily: the first forward pass compiles), and mark the
    input embeddings' output as needing a gradient (see below). Returns how many layers; 0 when the
    model has no recognisable layer stack (it then runs as it is)."""
    layers = decoder_layers(model)
    if layers is None:
        return 0
    compile_settings()
    # The first layer's input (the frozen embeddings' output) needs no gradient, the others' do, and
    # the compiled code is specialised on that: two versions, forward and backward each, to compile
    # at the first step. With the embeddings' output marked as needing one, every layer shares one
    # version. The price is the first layer's input gradient, about 0.35% of a 7B step's work
    # (q, k and v's input matmuls of one layer in 32), against one compile fewer (2-layer tiny model
    # on the CPU, empty cache: about 8 s of 42 less, docs/benchmarks.md). Gradient checkpointing
    # marks it already.
    if not getattr(model, "_require_grads_hooks", None) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
