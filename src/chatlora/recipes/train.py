"""`chatlora train`: data → checked, rendered, masked, cached tokens → LoRA training → a run folder.

Read top to bottom: config → data (checked before any weight loads) → model → LoRA → Trainer → save.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from chatlora.config.load import to_dict
from chatlora.config.schema import Config
from chatlora.errors import ConfigError
from chatlora.model.tokenized import check_data, load_data
from chatlora.run import RunDir, adapter_folder, replace_dir
from chatlora.trainer.distributed import split
from chatlora.trainer.distributed.world import start as start_world
from chatlora.trainer.lifecycle.folder import RunLifecycle

# torch, transformers and what imports them (seconds on a small CPU) come in `_train` after the data
# is checked: a bad row, a missing adapter or a bad config is refused in a fraction of a second.


def _builds_on_gpu(cfg: Config, fsdp, plan) -> bool:
    """Where the base model is built. FSDP2 loads on the CPU (the model need not fit one GPU) and
    fully_shard moves each shard to its GPU. Random weights (benchmarks, dry runs) are built on the GPU
    even then when they fit in its free memory: drawing 7 B of them on the CPU takes each process over
    a minute, and fully_shard keeps each GPU's shard where it is. `plan`: the memory plan (its
    architecture's size), None for an architecture it does not know (the CPU then, as for loaded weights)."""
    import torch

    if not torch.cuda.is_available():
        return False
    if not fsdp:
        return True
    if not cfg.model.random_init or plan is None:
        return False
    from chatlora.model.load import resolve_dtype

    weights = plan.arch.params * resolve_dtype(cfg.model.dtype).itemsize
    free, _total = torch.cuda.mem_get_info()
    return weights < 0.8 * free  # room left for the shard and the buffers sharding takes


def train(cfg: Config, echo: Callable[[str], None] = print, callbacks: list | None = None) -> RunDir:
    """Train a LoRA adapter as the config says (or resume one: `cfg.resume`); returns the run folder.
    `callbacks` are extra transformers TrainerCallbacks (benchmarks use them to time steps).

    Raises ChatloraError for bad input, Preempted after SIGTERM or a first Ctrl-C (a checkpoint is
    saved), NonFiniteError on a NaN/inf loss, StorageError when the disk refuses a write
    (trainer/lifecycle/folder.py: what is kept of the run folder in each case)."""
    with RunLifecycle(cfg, echo) as life:
        return _train(cfg, echo, callbacks, life)


def _trains_on_gpu(args) -> bool:
    """Whether training runs on a CUDA GPU (the GPU-only settings: model.cuda_graphs, model.kernels)."""
    import torch

    return torch.cuda.is_available() and not args.use_cpu


def shared_prompt_form(cfg, model) -> str | None:
    """How a row of shared prompts tells the model's attention who sees whom (data/collate.py
    pack_shared): "varlen" for chatlora's varlen kernel, "mask" (a dense 4D mask) for sdpa and eager;
    None without preference.share_prompt. Refuses what neither form computes exactly."""
    from chatlora.model import attention
    from chatlora.trainer.overrides import attention_implementation

    if not cfg.preference.share_prompt:
        return None
    kernel = attention_implementation(model)
    if kernel == attention.NAME:
        return "varlen"
    if kernel not in ("sdpa", "eager"):
        raise ConfigError(f"preference.share_prompt: the {kernel} attention takes no mask that shares a prompt; "
                          "use sdpa or eager (model.attn_implementation), or preference.share_prompt=false")
    if attention.has_sliding_window(model.config):
        # The dense mask replaces transformers' own, sliding windows included.
        raise ConfigError(f"preference.share_prompt: this {model.config.model_type} model has sliding-window layers, which "
                          "the shared-prompt mask does not close; it needs varlen attention (a CUDA GPU, torch 2.11 or "
                          "later), or preference.share_prompt=false")
    return "mask"


def _graphs_possible(cfg: Config, args, processes: int, collator, echo: Callable[[str], None]) -> bool:
    """Whether model.cuda_graphs can be used here. `true` that cannot prints a note saying why
    (training goes on without); `auto` stays quiet where graphs never apply (the CPU) and says why
    on a GPU."""
    from chatlora.data.collate import PackCollator

    asked = cfg.model.cuda_graphs
    if asked is False:
        return False
    why = ("it needs a CUDA GPU" if not _trains_on_gpu(args)
           else "it needs one process" if processes > 1
           else "the preference stage is not recorded" if cfg.stage == "dpo"
           else "it needs packed rows (data.packing)" if not isinstance(collator, PackCollator)
           else "it does not work with gradient checkpointing (set training.gradient_checkpointing=false)"
           if args.gradient_checkpointing
           else "a 4-bit base is not recorded (model.quantize)" if asked == "auto" and cfg.model.quantize != "none"
           else None)
    if why and asked is True:
        echo(f"note: model.cuda_graphs ignored: {why}")
    elif why and _trains_on_gpu(args):
        echo(f"cuda graphs: off ({why.replace('it needs', 'they need').replace('it does', 'they do')})")
    return why is None


def _train(cfg: Config, echo: Callable[[str], None], callbacks: list | None, life: RunLifecycle) -> RunDir:
    if cfg.model.adapter:
        adapter_folder(cfg.model.adapter)  # a missing SFT run is named before the data and the weights load
    # Several processes (torchrun, accelerate launch, --gpus): rank 0 prints and writes for all.
    world = start_world(cfg.training)
    if cfg.stage == "dpo" and (world.size > 1 or cfg.data.batch_tokens or cfg.data.streaming):  # not built yet (docs/preference.md)
        raise ConfigError("stage: dpo trains on one process, one packed row per micro-batch, from data read whole: "
                          "run it without --gpus, data.batch_tokens and data.streaming")
    if not world.main:
        echo = lambda _line: None  # noqa: E731
    else:  # a wrong output_dir or resume target: refused now, as start() would refuse it after the data
        life.refuse_early(RunDir.for_config(cfg))

    # 1. Data: every row checked and rendered before any weight is loaded; rank 0 tokenizes first
    # into the cache, the other processes then load it from there.
    checked = world.in_turn(lambda: check_data(cfg, echo) if world.main else load_data(cfg, echo))
    tokenizer, data = checked.tokenizer, checked.data
    import torch
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from chatlora.data.collate import PackCollator, PadCollator, PreferenceCollator
    from chatlora.model import quant
    from chatlora.model.kernels import use_liger
    from chatlora.model.layers import compile_layers
    from chatlora.model.load import load_model, model_config
    from chatlora.model.lora import (add_lora, count_parameters, linear_names, save_adapter, save_initial_adapter,
                                     start_from_adapter, unmatched_targets)
    from chatlora.model.loss import packing_is_exact
    from chatlora.model.preference import WITH_REFERENCE
    from chatlora.plan.entry import plan_for, samples_of
    from chatlora.trainer.arguments import TRAINING_DEFAULTS, loraplus_optimizer, training_arguments
    from chatlora.trainer.callbacks import GenerationMonitor, MetricsLog, Progress, log_tensorboard_to
    from chatlora.trainer.distributed.fsdp import full_adapter_state
    from chatlora.trainer.overrides import attention_implementation, undo_evaluation_prepare
    from chatlora.trainer.plot import plot_losses
    from chatlora.trainer.speed.graphs import GRAPH_PAD, PassGraphs
    from chatlora.trainer.trackers import Trackers, wanted
    from chatlora.trainer.trainer import ChatTrainer

    # The memory plan, before any weight loads: an out-of-memory found now costs seconds, not minutes.
    # data.batch_tokens=auto / training.gradient_checkpointing=auto are decided here.
    samples = samples_of(data)  # token counts, also for splitting each step's samples over several processes
    cfg, plan = plan_for(cfg, checked.source, samples, echo)
    if cfg.model.quantize != "none":
        quant.require_cuda_for_training()
    run = RunDir(world.share(str(RunDir.for_config(cfg).path)))  # rank 0's name: it holds the time
    args = training_arguments(cfg, run, world.size)  # checked before the run folder exists: a bad value leaves nothing
    record = split.record(cfg, args, world.size, world.nodes)

    def decide():  # rank 0 alone makes (or reuses) the run folder; an error there stops every process
        checkpoint = life.start(run, args, data.train.key)  # a new folder, or the checkpoint to resume from
        if checkpoint:
            note = split.check_resume(life.run.path, record)  # a changed world size: handled or refused
            if note:
                echo(note)
        return life.decision()

    decision = world.share(world.on_main(decide))
    resume = decision[2] if decision[0] == "resume" else None
    if not world.main:
        life.follow(args, data.train.key, decision)
    if life.finished:
        return life.run
    run = life.run
    if world.main:
        run.write_config(to_dict(cfg))
        run.write_json(run.data_report, checked.report)
        tokenizer.save_pretrained(run.tokenizer)
        split.write_record(run.path, record)
    echo(f"run folder: {run.path}")
    if world.size == 1 and torch.cuda.device_count() > 1:
        echo(f"training on 1 of the {torch.cuda.device_count()} GPUs here; `chatlora train --gpus {torch.cuda.device_count()} ...` uses them all")

    # 2. Model and adapter.
    seed = int(cfg.training.get("seed", TRAINING_DEFAULTS["seed"]))
    set_seed(seed)
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if _builds_on_gpu(cfg, args.fsdp, plan) else None
    # Liger patches transformers' code: before the model is built. `auto` has nothing to do on a CPU.
    # Under FSDP2 `auto` leaves the model's own code: Liger's kernels are not measured on sharded layers.
    if cfg.model.kernels == "liger" or cfg.model.kernels == "auto" and _trains_on_gpu(args) and not args.fsdp:
        model_type = model_config(checked.source, cfg.model).model_type
        line = use_liger(model_type, _trains_on_gpu(args), cfg.model.compile == "layers", cfg.model.kernels)
        if line:
            echo(line)
    model = load_model(checked.source, cfg.model, tokenizer, checked.generation_config, device)
    set_seed(seed)  # the adapter's initial weights depend on the seed alone, not on what loading drew
    layers = linear_names(model)
    dpo = cfg.stage == "dpo"
    initial = None
    if cfg.model.adapter:  # its frozen copy is the reference of the losses that have one
        reference = dpo and cfg.preference.loss in WITH_REFERENCE
        model = start_from_adapter(model, cfg.model.adapter, reference, args.gradient_checkpointing)
        echo(f"adapter: starting from {cfg.model.adapter}" + (" (its frozen copy is the reference)" if reference else ""))
    else:
        model = add_lora(model, cfg.lora, args.gradient_checkpointing)
        initial = save_initial_adapter(model, cfg.lora)  # PiSSA/OLoRA: the saved adapter is converted against it
    unmatched = unmatched_targets(model, cfg.lora.target_modules)
    if unmatched:
        echo(f"warning: lora.target_modules {', '.join(unmatched)} match no layer of this {model.config.model_type} "
             f"model and adapt nothing; its linear layers: {', '.join(layers)}")
    trainable, total = count_parameters(model)
    echo(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")

    # 3. Train.
    collator = PadCollator(tokenizer.pad_token_id)
    if dpo:  # chosen and rejected in one packed pass: the model must keep packed samples apart
        if not packing_is_exact(model):
            raise ConfigError(f"stage: dpo packs each step's replies into one row, and this {model.config.model_type} model lets "
                              "packed samples attend to each other")
        collator = PreferenceCollator(shared_prompt_form(cfg, model))
    elif cfg.data.packing:
        if args.fsdp or packing_is_exact(model):  # FSDP2: checked on the sharded model (ChatTrainer.train_begins)
            collator = PackCollator(cfg.data.batch_tokens)
        else:
            echo("warning: this model lets packed samples attend to each other; padding instead (data.packing=false)")
    graphs = _graphs_possible(cfg, args, world.size, collator, echo)
    if graphs:
        pad_id = tokenizer.pad_token_id
        collator.pad_to = GRAPH_PAD
        collator.pad_id = pad_id if pad_id is not None and pad_id < model.get_input_embeddings().num_embeddings else 0
        echo(f"cuda graphs: each packed pass recorded once per shape after {PassGraphs.WARMUP} eager steps and replayed "
             f"(rows padded to a multiple of {GRAPH_PAD} tokens)")
    if cfg.model.compile == "layers":
        # After the packing check: run on compiled layers, its inference passes would each compile a
        # version of the layer that training never uses (and that every layer call checks first).
        layers = compile_layers(model)
        echo(f"compile: {layers} decoder layers, compiled at the first steps" if layers
             else "compile: no decoder layer stack found; training eagerly")
    # A step's samples packed into passes by a token budget: memory depends on the budget, not on the
    # number of samples, so several processes may take different numbers (trainer/distributed/balance.py).
    token_passes = bool(cfg.data.batch_tokens) and isinstance(collator, PackCollator)
    echo(f"batches: {split.describe(args, world.size, token_passes)}, "
         + (f"packed into forward passes of at most {cfg.data.batch_tokens} tokens" if token_passes
            else f"{args.per_device_train_batch_size} per forward pass, " + ("packed" if isinstance(collator, (PackCollator, PreferenceCollator)) else "padded"))
         + (f", each pair's prompt once ({collator.share_prompt})" if getattr(collator, "share_prompt", None) else "")
         + f"; attention: {attention_implementation(model)}")
    progress = Progress()
    metrics_log = MetricsLog(run.metrics, run.plot, progress)
    write = lambda line: progress.bar.write(line) if progress.bar is not None else echo(line)  # noqa: E731
    monitor = GenerationMonitor.build(cfg, checked.renderer, data.val_conversations, write)
    columns = [c for c in data.train.dataset.column_names if c not in ("row", "cut", "origin")]
    # wandb, swanlab, mlflow: runs started with their files in the run folder and chatlora's config
    trackers = Trackers(wanted(args.report_to) if world.main else [], to_dict(cfg))
    trackers.start(run.path)
    trainer = ChatTrainer(
        model=model,
        args=args,
        train_dataset=data.train.dataset.select_columns(columns),
        eval_dataset=data.validation.dataset.select_columns(columns) if data.validation else None,
        data_collator=collator,
        lengths=samples.lengths,
        uneven_shares=token_passes,
        cuda_graphs=graphs,
        # Stamped atomic checkpoints, the NaN guard, stop on SIGTERM / first Ctrl-C: the trainer calls them.
        stamp=life.stamp,
        guard=life.guard(),
        stop=life.stop,
        processing_class=tokenizer,
        preference=cfg.preference if dpo else None,
        optimizers=(loraplus_optimizer(cfg, args, model), None),
        callbacks=[progress, metrics_log, *([monitor] if monitor else []), trackers,
                   *(callbacks or [])],
    )
    if monitor:
        monitor.trainer = trainer
    log_tensorboard_to(trainer, run.path / "tensorboard")
    trackers.attach(trainer, before=[metrics_log])
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    life.attach(trainer)
    # FSDP2: accelerate must shard the model and its optimizer together, which train() does; an
    # evaluate() before it is refused ("a model and optimizer must be passed together"). So the
    # held-out loss before training is taken inside train(), at step 0, and read back from the log.
    evaluate_in_train = bool(args.fsdp) and data.validation is not None and not resume
    if evaluate_in_train:
        args.eval_on_start = True
    before = None if evaluate_in_train else life.eval_loss_before() if resume else trainer.evaluate()["eval_loss"] if data.validation else None
    undo_evaluation_prepare(trainer)  # else DDP would never wrap the model (see there)
    trainer.train(resume_from_checkpoint=resume)
    life.finished_training(trainer)  # raises Preempted when a signal stopped it early
    if trainer.graphs is not None:
        echo(trainer.graphs.summary())
    if evaluate_in_train:
        before = life.eval_loss_before()
    if args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        echo(f"best checkpoint: {trainer.state.best_model_checkpoint} (eval_loss {trainer.state.best_metric:.4f}), "
             "kept as the run's adapter")

    # 4. Save: the adapter goes to a temporary folder first, so a crash never leaves half of one.
    tmp = run.path / ".adapter.tmp"
    state = full_adapter_state(model)  # FSDP2: every process gathers the LoRA shards whole; else None
    if world.main:
        if checked.source.kind == "gguf":
            # peft records the folder the GGUF file sits in, which nothing can load alone; the config's
            # name (the embedded model's, or the .gguf path) loads it again, so the adapter folder alone
            # finds its base (`chatlora chat RUN/adapter` with no --model).
            for settings in model.peft_config.values():
                settings.base_model_name_or_path = cfg.model.name
        # The trained adapter alone: a frozen reference (REFERENCE_ADAPTER) is not part of the result, and
        # stays loaded for the evaluation below, which would otherwise measure against the base model.
        save_adapter(model, tmp, initial, state)
        replace_dir(tmp, run.adapter)
    if data.validation:
        result = trainer.evaluate()
        after = result["eval_loss"]
        if dpo and "eval_rewards/accuracies" in result:
            echo(f"held-out preference accuracy: {first_accuracy(run):.1%} before training -> {result['eval_rewards/accuracies']:.1%} after")
        if world.main:
            plot_losses(run.metrics, run.plot)  # with the final eval point
        echo(f"held-out loss: {before:.4f} before training -> {after:.4f} after")
    plot = f"loss plot: {run.plot}" if run.plot.exists() else "no loss plot: no step was logged (training.logging_steps)"
    echo(f"adapter saved: {run.adapter}  ({plot})")
    trackers.finish()
    if cfg.report.compare and data.val_conversations:
        # Every process generates (under FSDP2 each forward needs all of them); rank 0 writes.
        compare(model, checked.renderer, data.val_conversations[: cfg.report.compare], cfg.report.max_new_tokens, echo,
                run if world.main else None, initial)
    return run


def compare(model, renderer, conversations, max_new_tokens: int, echo: Callable[[str], None], run: RunDir | None,
            initial=None) -> None:
    """Greedy replies of the base model and the adapter to held-out prompts, one under the other.
    `initial`: a PiSSA/OLoRA start (model/lora.py: save_initial_adapter), whose base weights lack the
    adapter's starting components; the starting adapter on them is the base model again."""
    from chatlora.generate.replies import generate_replies
    from chatlora.generate.sampling import Sampling

    prompts = [c.messages[:-1] for c in conversations]
    tuned = generate_replies(model, renderer, prompts, Sampling(max_new_tokens=max_new_tokens))
    if initial is not None:
        model.load_adapter(os.path.join(initial.name, "initial"), adapter_name="initial")
        model.set_adapter("initial")
        base = generate_replies(model, renderer, prompts, Sampling(max_new_tokens=max_new_tokens))
        model.set_adapter("default")
        model.delete_adapter("initial")
    else:
        with model.disable_adapter():
            base = generate_replies(model, renderer, prompts, Sampling(max_new_tokens=max_new_tokens))
    lines = ["", "Held-out prompts, greedy replies (base model vs. trained adapter):"]
    for prompt, b, t, conv in zip(prompts, base, tuned, conversations):
        lines += [f"── {prompt[-1]['content']}",
                  f"   base    : {b.text}" + ("" if b.stopped else " [hit the token limit]"),
                  f"   adapter : {t.text}" + ("" if t.stopped else " [hit the token limit]"),
                  f"   expected: {conv.messages[-1]['content']}"]
    for line in lines:
        echo(line)
    if run is not None:
        (run.path / "compare.txt").write_text("\n".join(lines).strip() + "\n", encoding="utf-8")


def first_accuracy(run: RunDir) -> float:
    """The held-out preference accuracy of the first evaluation in the run's metrics (before training)."""
    from chatlora.trainer.plot import read_metrics

    return next((r["eval_rewards/accuracies"] for r in read_metrics(run.metrics) if "eval_rewards/accuracies" in r), float("nan"))
