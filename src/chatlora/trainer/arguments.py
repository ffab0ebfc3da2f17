"""TrainingArguments as chatlora builds them from a config: its defaults, the global batch split over
the processes, the GPU-only settings, and the best-checkpoint settings that evaluation implies."""

from __future__ import annotations

from typing import Any

import torch

from chatlora.config.schema import Config
from chatlora.errors import ConfigError
from chatlora.run import RunDir
from chatlora.trainer.distributed import split
from chatlora.trainer.overrides import one_gpu

# chatlora's defaults for TrainingArguments; anything under `training:` in the config wins.
TRAINING_DEFAULTS = {
    "logging_steps": 10,
    "report_to": "none",
    "save_strategy": "no",
    "include_num_input_tokens_seen": "non_padding",  # real tokens/s in the progress bar and metrics
    "remove_unused_columns": False,
    "label_names": ["labels"],
    "prediction_loss_only": True,
    "dataloader_pin_memory": torch.cuda.is_available(),
    # ChatTrainer leaves non-finite losses out of the logged loss on the device instead: Trainer's
    # filter reads every loss on the host, which makes it wait for the GPU at every step.
    "logging_nan_inf_filter": False,
    "seed": 42,
}


def training_arguments(cfg: Config, run: RunDir, processes: int = 1):
    from transformers import TrainingArguments

    kwargs = {**TRAINING_DEFAULTS, **cfg.training, "output_dir": str(run.checkpoints)}
    if "save_steps" in cfg.training and "save_strategy" not in cfg.training:
        # save_steps alone means saving every N steps, as in TrainingArguments itself (whose default
        # strategy is "steps"); chatlora's default of not saving must not swallow it.
        kwargs["save_strategy"] = "steps"
    # This process's share of the global batch (split.samples_per_step), and DDP/FSDP2 settings.
    kwargs = split.distributed_arguments(cfg, kwargs, processes)
    if cfg.data.batch_tokens:
        # The whole optimizer step's samples come as one batch; PackCollator splits it into forward
        # passes by the token budget, so the samples per step stay the recipe's.
        kwargs["per_device_train_batch_size"] = kwargs.get("per_device_train_batch_size", 8) * kwargs.pop("gradient_accumulation_steps", 1)
        kwargs["gradient_accumulation_steps"] = 1
    if not torch.cuda.is_available() and (kwargs.get("bf16") or kwargs.get("fp16")):
        # The GPU presets ask for bf16 mixed precision; on a CPU it is slow or unsupported.
        kwargs["bf16"] = kwargs["fp16"] = False
    if kwargs.get("dataloader_pin_memory") and "accelerator_config" not in kwargs:
        # Batches go to the GPU from pinned memory without the host waiting for the copy (and so for
        # all the work queued before it): the CPU prepares the next step while the GPU runs this one.
        kwargs["accelerator_config"] = {"non_blocking": True}
    kwargs = evaluation_arguments(cfg, kwargs)  # best-checkpoint saving completed (save_strategy=best, keep 1)
    try:
        args = TrainingArguments(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training: {e}") from None
    if processes == 1 and torch.cuda.device_count() > 1:
        # One process that sees several GPUs: Trainer would wrap the model in nn.DataParallel, which
        # splits every batch by rows (a packed batch is one row: the loss then fails) and is the slow
        # way to use several GPUs anyway. Train on one; `--gpus N` (torchrun, DDP) uses them all.
        one_gpu(args)
    return args


def evaluation_arguments(cfg: Config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments kwargs with the best-checkpoint settings completed (the config checked the
    combinations when it was loaded: config.schema._check_evaluation).

    `load_best_model_at_end` alone is enough: checkpoints are then saved only when the held-out loss
    improves (`save_strategy=best`) and only the best is kept (`save_total_limit=1`), unless the
    config says otherwise.
    """
    out = dict(kwargs)
    if out.get("load_best_model_at_end"):
        if "save_strategy" not in cfg.training:
            out["save_strategy"] = "best"
        if "save_total_limit" not in cfg.training:
            out["save_total_limit"] = 1
    return out


def loraplus_optimizer(cfg: Config, args, model):
    """LoRA+ (lora.plus_lr_ratio): peft's `create_loraplus_optimizer`, with the optimizer class and
    settings Trainer itself would build from `training:` (optim, betas, eps, weight_decay), the B
    matrices at plus_lr_ratio x learning_rate. Passed to Trainer as its optimizer, so its scheduler,
    checkpoints and exact resume handle it as their own. None without plus_lr_ratio."""
    if cfg.lora.plus_lr_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=cfg.lora.plus_lr_ratio,
                                     loraplus_weight_decay=args.weight_decay, **kwargs)
