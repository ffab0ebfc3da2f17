"""The plan's entry: print a config's memory and speed plan and resolve its auto values, for
`chatlora plan` and `chatlora train` (which prints the same plan before loading weights).

Read top to bottom: the GPU (detected, or named: `card`) → the data's sample lengths (`samples_of`,
or `worst_case` when the data cannot be read) → the printed plan (`describe`) → `plan_for`, which
turns packing off where the model refuses it, reads the architecture (no weights), and plans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from chatlora.config.schema import Config, parse_gib
from chatlora.errors import ConfigError, ModelError
from chatlora.plan.arch import Arch, read_arch
from chatlora.plan.batches import Samples
from chatlora.plan.memory import GiB, Memory
from chatlora.plan.plan import Plan, choose, make_plan
from chatlora.plan.speed import GPUS, Gpu, find_gpu

# Samples assumed when the data cannot be read: the config's max_length each, every token trained.
WORST_CASE_SAMPLES = 1000


def card(cfg: Config) -> tuple[Gpu | None, float | None, str]:
    """(the GPU from the speed table, the memory to plan for in GiB, a description of both)."""
    limit = parse_gib(cfg.plan.gpu_mem)
    if cfg.plan.gpu:
        gpu = find_gpu(cfg.plan.gpu)
        if gpu is None:
            raise ConfigError(f"plan.gpu: {cfg.plan.gpu!r} is not a GPU the plan knows; known: "
                              + ", ".join(g.name for g in GPUS.values()) + ". Give its memory with plan.gpu_mem instead.")
        mem = limit or gpu.memory_gib
        return gpu, mem, f"{gpu.name} ({mem:.1f} GiB{' as plan.gpu_mem says' if limit else ''})"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        total = torch.cuda.get_device_properties(0).total_memory / GiB
        gpu = find_gpu(name)
        mem = limit or total
        note = "" if gpu else "; not in the speed table, so no tokens/s"
        return gpu, mem, f"{name} ({mem:.1f} GiB{' as plan.gpu_mem says' if limit else ', detected'}{note})"
    if limit:
        return None, limit, f"a GPU with {limit:.1f} GiB (plan.gpu_mem; no GPU here; name one with plan.gpu for tokens/s)"
    return None, None, "no GPU detected (name one with --gpu, or give --gpu-mem)"


def samples_of(data) -> Samples:
    from chatlora.data.preflight import sample_sizes

    return Samples(*sample_sizes(data.train.dataset))  # by Arrow chunks: a streamed split may not fit in memory


def worst_case(cfg: Config) -> Samples:
    n = cfg.data.max_length
    return Samples([n] * WORST_CASE_SAMPLES, [n] * WORST_CASE_SAMPLES, measured=False)


def gib(x: float) -> str:
    return f"{x / GiB:6.2f} GiB"


def describe(plan: Plan, where: str, other: Memory | None = None) -> list[str]:
    """The plan as printed lines."""
    a, s, b, st, m = plan.arch, plan.setup, plan.batching, plan.stats, plan.memory
    weights = "4-bit NF4 layers, bf16 rest" if s.quant == "nf4" else ("bf16" if s.weight_bytes == 2 else "float32")
    lines = [f"plan for {where}:",
             f"  model     {a.name}: {a.params / 1e9:.2f} B parameters ({a.layers} layers, hidden {a.hidden}, "
             f"vocab {a.vocab:,}), weights {weights}; LoRA {a.lora:,} trainable"]
    if b.budget:
        how = f"packed into passes of at most {b.budget:,} tokens"
    else:
        how = f"{b.per_pass} per pass, " + ("packed" if b.packing else "padded to the longest")
    data = "" if plan.samples.measured else " (data not read: every sample assumed max_length long)"
    split = f" ({b.samples_per_step} on each of {b.processes} processes)" if b.processes > 1 else ""
    lines.append(f"  batches   {b.samples_per_step * b.processes} samples per optimizer step{split}, {how}; {b.steps:,} steps{data}")
    lines.append(f"            largest pass {st.largest.tokens:,} tokens ({st.largest.trained:,} trained); "
                 f"{st.passes_per_step:.2f} passes and {st.real_tokens_per_step:,.0f} tokens per step on average")
    lines.append("  peak GPU memory, predicted (torch.cuda.max_memory_allocated):")
    lines.append(f"    weights                          {gib(m.weights)}")
    lines.append(f"    LoRA weights, grads, AdamW state {gib(m.adapter)}")
    lines.append(f"    activations kept for backward    {gib(m.kept)}   (gradient checkpointing "
                 f"{'on' if s.checkpointing else 'off'}{', LoRA dropout' if s.dropout else ''})")
    lines.append(f"    {m.transient_is:<32} {gib(m.transient)}")
    verdict = ""
    if plan.fits is not None:
        verdict = f": {'fits' if plan.fits else 'does NOT fit'} {plan.gpu_mem_gib:.1f} GiB"
    lines.append(f"    total                            {gib(m.peak)}   the card needs ~{m.card_need / GiB:.1f} GiB "
                 f"(CUDA context, allocator slack){verdict}")
    if other is not None:
        lines.append(f"  with gradient checkpointing {'off' if s.checkpointing else 'on'}: {other.peak / GiB:.2f} GiB "
                     f"(the card ~{other.card_need / GiB:.1f} GiB)")
    if plan.speed:
        sp = plan.speed
        total = sp.seconds_per_step * b.steps
        lines.append(f"  speed     ~{sp.real_tokens_per_s:,.0f} real tokens/s, {sp.seconds_per_step:.2f} s per step, "
                     f"MFU {100 * sp.mfu:.1f}% on {plan.gpu.name}: ~{total / 60:.1f} min for {b.steps:,} steps "
                     "(calibrated on an H200; a rough guide elsewhere)")
    if plan.fits is False:
        lines.append("  to fit: gradient checkpointing (training.gradient_checkpointing=true), a smaller token budget, "
                     "data.batch_tokens=auto, or a 4-bit base (model.quantize=nf4)")
    return lines


def packing_for(cfg: Config, source, echo: Callable[[str], None] = print) -> Config:
    """`cfg`, with packing turned off (and a note saying why) for a model whose attention cannot
    take packed rows as varlen attention does (model/attention.py: packing_problem)."""
    from chatlora.model.attention import packing_problem
    from chatlora.model.load import model_config

    if not cfg.data.packing:
        return cfg
    try:
        config = model_config(source, cfg.model)
    except (OSError, ValueError):
        return cfg  # loading the model reports it
    why = packing_problem(config)
    if why is None:
        return cfg
    budget = f"; data.batch_tokens={cfg.data.batch_tokens} ignored" if cfg.data.batch_tokens else ""
    echo(f"packing: off for {config.model_type} ({why}); padded batches instead{budget}")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=False, batch_tokens=None))


def plan_for(cfg: Config, source, samples: Samples, echo: Callable[[str], None] = print, on_gpu: bool | None = None) -> tuple[Config, Plan | None]:
    """Print the plan of `cfg`; resolve its auto values. Returns the config to train with (autos
    replaced, packing off where the model refuses it: packing_for) and the plan (None when the
    architecture cannot be planned: a model this plan does not know; training then goes on, unless
    it asked for auto values).

    Raises ConfigError when auto values are asked for and nothing fits, or cannot be planned."""
    from chatlora.plan.plan import resolved

    cfg = packing_for(cfg, source, echo)
    asked_auto = cfg.data.batch_tokens == "auto" or cfg.training.get("gradient_checkpointing") == "auto"
    try:
        arch: Arch = read_arch(source, cfg.model, cfg.lora)
    except (ModelError, KeyError, TypeError, AttributeError) as e:
        if asked_auto:
            raise ConfigError(f"data.batch_tokens=auto / training.gradient_checkpointing=auto need the memory plan, "
                              f"which cannot read this model's architecture ({e}); set them to numbers") from None
        echo(f"plan: not available for this model ({e})")
        return cfg, None
    gpu, mem, where = card(cfg)
    on_gpu = (gpu is not None or mem is not None or torch.cuda.is_available()) if on_gpu is None else on_gpu
    if on_gpu and "gradient_checkpointing" not in cfg.training:
        # Unset on a GPU means auto: recompute only when the activations would not fit. On a CPU
        # (host memory) it stays off, as TrainingArguments has it.
        cfg = dataclasses.replace(cfg, training={**cfg.training, "gradient_checkpointing": "auto"})
    if asked_auto or cfg.training.get("gradient_checkpointing") == "auto":
        plan, why = choose(cfg, arch, samples, gpu, mem, on_gpu)
        cfg = resolved(cfg, plan)
    else:
        plan, why = make_plan(cfg, arch, samples, gpu, mem, on_gpu), None
    other = make_plan(cfg, arch, samples, None, None, on_gpu, checkpointing=not plan.setup.checkpointing).memory
    for line in describe(plan, f"{cfg.name} on {where}", other):
        echo(line)
    if why:
        echo(why)
    return cfg, plan
