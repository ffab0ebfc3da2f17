"""A config's plan: its batches replayed on the data, the predicted peak memory and speed, and the
choices `data.batch_tokens=auto` / `training.gradient_checkpointing=auto` make from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from chatlora.config.schema import Config
from chatlora.errors import ConfigError
from chatlora.plan.arch import Arch
from chatlora.plan.batches import Batching, PassStats, Samples, run_steps, simulate
from chatlora.plan.memory import GiB, Memory, Setup, estimate
from chatlora.plan.speed import Gpu, Speed, estimate_speed
from chatlora.trainer.distributed.split import DEFAULT_MICRO_BATCH, samples_per_step, split_step
from chatlora.trainer.distributed.world import size_from_env

# TrainingArguments' own defaults, for keys a config leaves out.
DEFAULT_EPOCHS = 3.0
# Ranks auto's candidates when the GPU is unknown (a CPU-only machine planning with --gpu-mem):
# the speed model's numbers are not reported then, only used to order the choices.
REFERENCE_GPU = Gpu("reference", 80, 989, 3.35)


@dataclass(frozen=True)
class Plan:
    arch: Arch
    setup: Setup
    batching: Batching
    stats: PassStats
    memory: Memory
    speed: Speed | None
    """None when no GPU is known (no card detected and none named)."""
    gpu: Gpu | None
    gpu_mem_gib: float | None
    """The memory planned for: plan.gpu_mem, else the card's."""
    samples: Samples

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_mem_gib is None else self.memory.card_need <= self.gpu_mem_gib * GiB


def setup_of(cfg: Config, on_gpu: bool, checkpointing: bool | None = None) -> Setup:
    t = cfg.training
    dtype = cfg.model.dtype
    weight_bytes = 4 if dtype == "float32" or (dtype == "auto" and not on_gpu) else 2
    autocast = on_gpu and bool(t.get("bf16") or t.get("fp16"))
    ckpt = t.get("gradient_checkpointing") is True if checkpointing is None else checkpointing
    return Setup(weight_bytes=weight_bytes, quant=cfg.model.quantize, autocast=autocast or weight_bytes == 2,
                 dropout=cfg.lora.dropout > 0, checkpointing=ckpt, dora=cfg.lora.use_dora)


def batching_of(cfg: Config, samples: Samples, budget: int | None | str = "config") -> Batching:
    t = cfg.training
    per = int(t.get("per_device_train_batch_size", DEFAULT_MICRO_BATCH))
    step = samples_per_step(cfg)  # the global batch, as training splits it
    processes = size_from_env()
    if step % processes:  # training refuses this split with its own message; plan one process's step
        processes = 1
    micro, _ = split_step(step, processes, per)
    share = step // processes
    budget = cfg.data.batch_tokens if budget == "config" else budget
    steps = run_steps(len(samples.lengths), step, float(t.get("num_train_epochs", DEFAULT_EPOCHS)), int(t.get("max_steps", -1)))
    return Batching(samples_per_step=share, per_pass=share if budget else micro, packing=cfg.data.packing,
                    budget=budget if isinstance(budget, int) else None, steps=steps, processes=processes)


def peak_of(arch: Arch, setup: Setup, stats: PassStats) -> Memory:
    candidates = [estimate(arch, setup, p.tokens, p.trained) for p in (stats.largest, stats.most_trained)]
    return max(candidates, key=lambda m: m.peak)


def make_plan(cfg: Config, arch: Arch, samples: Samples, gpu: Gpu | None, gpu_mem_gib: float | None, on_gpu: bool = True,
              budget: int | None | str = "config", checkpointing: bool | None = None) -> Plan:
    """The plan of `cfg` as written (or with the given budget / checkpointing)."""
    setup = setup_of(cfg, on_gpu, checkpointing)
    batching = batching_of(cfg, samples, budget)
    stats = simulate(samples, batching, seed=int(cfg.training.get("seed", 42)))
    speed = estimate_speed(arch, stats, setup, gpu) if gpu else None
    return Plan(arch, setup, batching, stats, peak_of(arch, setup, stats), speed, gpu, gpu_mem_gib, samples)


def budgets(samples: Samples, cfg: Config) -> list[int]:
    """Token budgets auto tries: powers of two from the longest sample up to one pass per optimizer step."""
    longest = max(samples.lengths, default=cfg.data.max_length)
    step = batching_of(cfg, samples, None).samples_per_step
    most = sum(sorted(samples.lengths)[-step:])  # no step holds more than its longest samples
    out, b = [], 1 << max(4, (longest - 1).bit_length())
    while True:
        out.append(b)
        if b >= most:
            return out
        b *= 2


def choose(cfg: Config, arch: Arch, samples: Samples, gpu: Gpu | None, gpu_mem_gib: float | None, on_gpu: bool = True) -> tuple[Plan, str]:
    """Resolve data.batch_tokens=auto and training.gradient_checkpointing=auto: of the settings whose
    predicted need fits `gpu_mem_gib` (all of them when it is None), the fastest by the speed model.

    Returns the chosen plan and a sentence saying what was chosen and why. Raises ConfigError when
    nothing fits."""
    auto_budget = cfg.data.batch_tokens == "auto"
    auto_ckpt = cfg.training.get("gradient_checkpointing") == "auto"
    budget_options: list = budgets(samples, cfg) if auto_budget else [cfg.data.batch_tokens]
    ckpt_options = [False, True] if auto_ckpt else [cfg.training.get("gradient_checkpointing") is True]
    plans = [make_plan(cfg, arch, samples, gpu, gpu_mem_gib, on_gpu, b, c) for b in budget_options for c in ckpt_options]
    limit = None if gpu_mem_gib is None else gpu_mem_gib * GiB
    fitting = [p for p in plans if limit is None or p.memory.card_need <= limit]
    if not fitting:
        least = min(plans, key=lambda p: p.memory.card_need)
        raise ConfigError(
            f"nothing fits {gpu_mem_gib:.1f} GiB: the least memory-hungry setting (token budget "
            f"{least.batching.budget or 'none'}, gradient checkpointing {'on' if least.setup.checkpointing else 'off'}) "
            f"needs about {least.memory.card_need / GiB:.1f} GiB ({least.memory.peak / GiB:.1f} GiB allocated at its peak). "
            + ("Try model.quantize=nf4 (a 4-bit base), " if cfg.model.quantize == "none" else "Try ")
            + "a smaller data.max_length, or a smaller model.")

    def seconds(p: Plan) -> float:
        speed = p.speed or estimate_speed(arch, p.stats, p.setup, REFERENCE_GPU)
        return speed.seconds_per_step

    # Budgets above the largest step all run the same passes: of the settings within 2% of the
    # fastest, the smallest budget, so an unluckily long step can never make a larger pass.
    fastest = min(seconds(p) for p in fitting)
    best = min((p for p in fitting if seconds(p) <= fastest * 1.02), key=lambda p: (p.batching.budget or 0, seconds(p)))
    where = "no memory limit (no GPU detected and no plan.gpu_mem)" if gpu_mem_gib is None else f"{gpu_mem_gib:.1f} GiB"
    parts = []
    if auto_budget:
        parts.append(f"data.batch_tokens={best.batching.budget}")
    if auto_ckpt:
        parts.append(f"training.gradient_checkpointing={'true' if best.setup.checkpointing else 'false'}")
    why = (f"auto chose {' and '.join(parts)}: the fastest of {len(plans)} settings tried that fit {where} "
           f"(predicted peak {best.memory.peak / GiB:.1f} GiB allocated, ~{best.memory.card_need / GiB:.1f} GiB on the card)")
    return best, why


def resolved(cfg: Config, plan: Plan) -> Config:
    """The config with auto values replaced by the plan's choice (what the run folder records)."""
    training = {**cfg.training}
    if training.get("gradient_checkpointing") == "auto":
        training["gradient_checkpointing"] = plan.setup.checkpointing
    data = dataclasses.replace(cfg.data, batch_tokens=plan.batching.budget) if cfg.data.batch_tokens == "auto" else cfg.data
    return dataclasses.replace(cfg, data=data, training=training)
