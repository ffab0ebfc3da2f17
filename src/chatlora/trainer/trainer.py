"""The trainer: transformers' Trainer with chatlora's loss (the mean over the optimizer step's trained
tokens, with the output layer run only where a token is trained, and token-budget chunks within a
step), and the one owner of every per-step value. It calls the non-finite guard, clipping, the late
read-backs and stop-on-signal itself; the callbacks it is given only watch (trainer/callbacks.py).
Trainer's private members are reached through trainer/overrides.py only."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from chatlora.data.collate import PackCollator
from chatlora.evaluate.loss import held_out_batches, held_out_loss
from chatlora.model.loss import trained_token_loss
from chatlora.trainer import overrides
from chatlora.trainer.distributed import fsdp
from chatlora.trainer.distributed.balance import train_dataloader
from chatlora.trainer.guard import NonFiniteGuard, Step, torch_optimizer
from chatlora.trainer.lifecycle.stop import StopOnSignal
from chatlora.trainer.overrides import TrainerOverrides
from chatlora.trainer.preference import PreferenceSteps
from chatlora.trainer.speed import walks
from chatlora.trainer.speed.grads import clip_sharded, sharded_grads, sharded_norm
from chatlora.trainer.speed.graphs import PassGraphs
from chatlora.trainer.speed.readback import Readback


class ChatTrainer(PreferenceSteps, TrainerOverrides):  # the loss path of `stage: dpo`; stamped checkpoints, Trainer's privates
    def __init__(self, *args, lengths: Sequence[int] | None = None, uneven_shares: bool = False,
                 cuda_graphs: bool = False, guard: NonFiniteGuard | None = None, stop: StopOnSignal | None = None,
                 stamp: dict[str, Any] | None = None, **kwargs):
        super().__init__(*args, stamp=stamp, **kwargs)
        # -- the run's settings
        self.cuda_graphs = cuda_graphs
        """Replay each packed pass from a CUDA graph (trainer/speed/graphs.py); needs rows padded by
        PackCollator(pad_to=...) and one process."""
        self.lengths = lengths
        """Tokens of each training sample. On several processes each step's samples are split over
        them by tokens (trainer/distributed/balance.py); None: counted from the dataset's input_ids then."""
        self.uneven_shares = uneven_shares
        """The collator splits a process's share of a step into passes by a token budget, so the
        processes may take different numbers of samples; else each takes the same number."""
        self.guard = guard
        """The non-finite guard (trainer/guard.py), judging each step before its optimizer step; None: none."""
        self.stop = stop
        """Stop-on-signal (trainer/lifecycle/stop.py), asked at each step's end; None: none."""
        # Our loss is divided by num_items_in_batch, the trained tokens of the whole optimizer step
        # (all micro-batches, all ranks), so Trainer must not divide it by the accumulation steps
        # again; this is the flag it reads for that.
        self.model_accepts_loss_kwargs = True
        # -- found once per run: what Trainer's per-step bookkeeping looks for in the whole model
        # (trainer/speed/walks.py), the units FSDP2 keeps gathered, the recorded passes
        self._trainable: list[torch.nn.Parameter] | None = None
        self._tuner_layers: list[torch.nn.Module] | None = None
        self._flops_per_token: int | None = None
        self._local_clipping: bool | None = None
        self._shortcuts_on: torch.nn.Module | None = None
        self._gathered_units: list | None = None
        self.graphs: PassGraphs | None = None
        """The recorded passes of the last run (trainer/speed/graphs.py), once its first pass was made."""
        # -- per step
        self.loss_weight = 1.0
        """0 during a pass that only keeps the processes of a sharded model in step (see passes())."""
        self.losses_finite: torch.Tensor | None = None
        """A boolean tensor: every micro-batch loss since the guard last looked was finite. Kept on
        the device, so noting it costs no host sync; the guard reads it once per optimizer step."""
        self.step_grad_norm: torch.Tensor | None = None
        """The norm of the step's gradients once Trainer has taken it (to clip, to log), until the
        non-finite guard takes it: one norm serves both."""
        self.token_counts: list[Readback] = []
        """Token counts of the last steps, not yet added to state.num_input_tokens_seen."""
        self.process_tokens: torch.Tensor | int = 0
        """Input tokens this process trained since the last logged loss (logged, on several
        processes, as tokens_per_process: how evenly the steps were split)."""
        self.add_callback(StepEvents(self))  # after every callback given: they see a step before the guard acts

    # -- Trainer's events, delivered by StepEvents -------------------------------------------------

    def train_begins(self) -> None:
        if self.args.fsdp:  # the model is sharded now; the monitor must be able to generate
            fsdp.register_generate(self.model)
            if isinstance(self.data_collator, PackCollator):
                fsdp.check_packing(self.model, self.args.device)
        if self.guard is not None:
            self.guard.begin(self.optimizer)
        if self.stop is not None:
            self.stop.train_begins()

    def before_optimizer_step(self, state) -> None:
        """The step's gradients are complete (and clipped): the guard judges them, and the losses."""
        if self.guard is None:
            return
        step = Step(losses_finite=self.losses_finite, norm=self.step_grad_norm, params=self.trainable(),
                    optimizer=torch_optimizer(self.optimizer), scaler=getattr(self.accelerator, "scaler", None) is not None,
                    plain_grads=self.local_clipping())
        self.losses_finite = self.step_grad_norm = None  # used up
        self.guard.before_optimizer_step(self.args, state, step)

    def after_optimizer_step(self) -> None:
        if self.guard is not None:
            self.guard.after_optimizer_step()

    def step_ends(self, control) -> None:
        self.log_skipped()
        if self.stop is not None:
            self.stop.step_ends(self.args, self.state, control)

    def train_ends(self) -> None:
        if self.guard is not None:
            self.guard.end(self.state, self.optimizer)
            self.log_skipped()
        if self.stop is not None:
            self.stop.train_ends()

    def log_skipped(self) -> None:
        count = self.guard.newly_skipped() if self.guard is not None else None
        if count is not None:
            self.log({"nonfinite_skipped_steps": count})

    # -- the run -----------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        # Found again for each run (preparing the model again gives it other parameters), and the
        # model gets its own train() and zero_grad() back when the run ends, however it ends.
        self._trainable = self._tuner_layers = self._flops_per_token = self._local_clipping = self._gathered_units = None
        self.graphs = self.step_grad_norm = None
        self.token_counts = []
        try:
            return super().train(*args, **kwargs)
        finally:
            if self.graphs is not None:
                self.graphs.release()
            if self._shortcuts_on is not None:
                overrides.remove_shortcuts(self._shortcuts_on)
                self._shortcuts_on = None

    def trainable(self) -> list[torch.nn.Parameter]:
        """The parameters being trained, listed at the first call. Called during training only:
        preparing the model for FSDP2 replaces its parameters."""
        if self._trainable is None:
            self._trainable = walks.trainable(self.model)
        return self._trainable

    def floating_point_ops(self, inputs) -> int:
        # Trainer's count (6 x parameters x input tokens) with the parameters counted once.
        if self._flops_per_token is None:
            self._flops_per_token = walks.flops_per_token(self.model)
        main = getattr(self.model, "main_input_name", "input_ids")
        return self._flops_per_token * inputs[main].numel() if main in inputs else 0

    def local_clipping(self) -> bool:
        """Whether the gradients are plain tensors on this process (one GPU, DDP), which accelerate
        clips as torch does from any list of them: the trained parameters listed once then do."""
        if self._local_clipping is None:
            self._local_clipping = not (self.is_fsdp_enabled or self.is_deepspeed_enabled) and not any(
                hasattr(p, "device_mesh") for p in self.trainable())  # DTensors (tensor parallelism): Trainer's own path
        return self._local_clipping

    @property
    def lockstep(self) -> bool:
        """Whether every process must make as many forward passes as every other (see passes())."""
        return self.is_fsdp_enabled and self.accelerator.num_processes > 1

    def passes(self, count: int) -> int:
        """How many forward passes to make for `count` chunks: `count`, or under FSDP on several
        processes the most any process has. FSDP gathers each layer's weights in every forward and
        backward pass, so a process that made fewer passes than another would leave it waiting in a
        collective for ever: a hang, not an error (token-budget chunks differ between processes). The
        extra passes repeat the last chunk with its loss weighted zero. DDP needs none of this: it
        communicates once per step, after the last pass."""
        if not self.lockstep:
            return count
        import torch.distributed as dist

        most = torch.tensor(count, device=self.accelerator.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most)

    def kept_gathered(self, model, more_passes: bool):
        """The context of a forward/backward pass: under FSDP2 on several processes, when more passes
        of the same optimizer step follow, the units that gather their weights for the whole pass
        keep them for the next one (trainer/distributed/fsdp.py: one gather per step instead of one per pass)."""
        if not (more_passes and self.lockstep):
            return nullcontext()
        if self._gathered_units is None:
            self._gathered_units = fsdp.gathered_through_backward(model)
        return fsdp.kept_between_passes(self._gathered_units)

    def sharded(self, model):
        """(gradients, process group) under FSDP2 when the gradients are shards on the GPUs, else None.
        torch's clipping and norm take DTensor shards tensor by tensor through DTensor's dispatch (a
        large CPU cost per step: docs/benchmarks.md); trainer/speed/grads.py does the same from the
        local shards and one all-reduce."""
        if not self.is_fsdp_enabled:
            return None
        params = [p for p in self.trainable() if p.grad is not None]
        group = sharded_grads(params)
        return None if group is None else (params, group)

    def gradient_norm(self, model, max_norm: float | None):
        """The gradients' norm before clipping, the gradients clipped to `max_norm` (None: left as
        they are), the cheapest way their kind allows; kept for the guard (step_grad_norm)."""
        self.step_grad_norm = norm = self._norm(model, max_norm)
        return norm

    def _norm(self, model, max_norm: float | None):
        if self.local_clipping():  # unclipped: Trainer's way, clipping to infinity
            return self.accelerator.clip_grad_norm_(self.trainable(), float("inf") if max_norm is None else max_norm)
        shards = self.sharded(model)
        if shards is None:
            return self.trainers_gradient_norm(model, max_norm)
        params, group = shards
        self.accelerator.unscale_gradients()  # fp16: as accelerate does before it clips (nothing otherwise)
        return sharded_norm(params, group) if max_norm is None else clip_sharded(params, max_norm, group)

    def get_train_dataloader(self):
        # Several processes: each step's samples split over them by tokens (see trainer/distributed/balance.py).
        loader = train_dataloader(self, self.lengths, self.uneven_shares) if self.accelerator.num_processes > 1 else None
        return loader if loader is not None else super().get_train_dataloader()

    def log(self, logs, start_time=None):
        self.read_late_values()
        if "loss" in logs and self.accelerator.num_processes > 1:
            # Every process logs the training loss at the same step (Trainer gathers it), so all meet here.
            mine = torch.as_tensor(self.process_tokens, device=self.args.device).reshape(1)
            logs["tokens_per_process"] = self.accelerator.gather(mine).tolist()
            self.process_tokens = 0
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None):
        return self.loss_to_log(self.step_loss(model, inputs, num_items_in_batch))

    def loss_to_log(self, loss: torch.Tensor) -> torch.Tensor:
        """Trainer's logging_nan_inf_filter, on the device: a NaN or inf loss adds the mean of the
        losses since the last log instead (the guard reports it). Trainer's own filter reads every
        loss on the host, a wait for the GPU at every step; chatlora turns it off (trainer/arguments.py)."""
        if self.args.logging_nan_inf_filter or not torch.is_tensor(loss):
            return loss
        mean = self.logged_loss_mean()
        if mean is None:
            return loss
        return torch.where(torch.isfinite(loss), loss, mean.to(loss.dtype))

    def count_tokens_late(self, inputs) -> bool:
        """Trainer's count of the tokens seen, without its .item(), which waits for the GPU at every
        step: read back once the GPU has it (trainer/speed/readback.py) and added a step later, or at
        once before anything logs or saves it (tokens_counted). False: Trainer counts (not on a GPU)."""
        how = self.args.include_num_input_tokens_seen
        ids = inputs.get(getattr(self.model, "main_input_name", "input_ids"))
        if how == "no" or not torch.is_tensor(ids) or not ids.is_cuda:
            return False
        pad = getattr(self.processing_class, "pad_token_id", None)
        if how == "non_padding" and "attention_mask" in inputs:
            count = inputs["attention_mask"].sum()
        elif how == "non_padding" and pad is not None:
            count = (ids != pad).sum()
        else:
            count = torch.full((), ids.numel(), dtype=torch.int64, device=ids.device)  # a fill: no copy to wait for
        self.tokens_counted(wait=False)
        self.token_counts.append(Readback(self.accelerator.gather(count.reshape(1).to(torch.int64)).sum()))
        return True

    def tokens_counted(self, wait: bool = True) -> None:
        """Adds the token counts read back so far (all of them with `wait`) to the state."""
        while self.token_counts and (wait or self.token_counts[0].ready()):
            self.state.num_input_tokens_seen += int(self.token_counts.pop(0).value())

    def read_late_values(self) -> None:
        """What reads device values back a step late (token counts, the non-finite guard's verdicts),
        read in full: before anything is logged or saved, so nothing is logged or saved past a bad step."""
        self.tokens_counted()
        if self.guard is not None:
            self.guard.settle(self.state)

    def before_checkpoint(self) -> None:
        self.read_late_values()  # may stop training (the guard): before anything is written

    def step_loss(self, model, inputs, num_items_in_batch=None):
        """One micro-batch's forward and backward passes; returns its loss."""
        if self._shortcuts_on is None:  # Trainer calls these at every step (trainer/speed/walks.py)
            overrides.skip_unchanged_train(self.model)
            overrides.zero_trained_grads_only(self.model, self.trainable())
            self._shortcuts_on = self.model
        if self.accelerator.num_processes > 1:  # padded batches count their mask; packed ones have no padding
            self.process_tokens = self.process_tokens + (inputs["attention_mask"].sum() if "attention_mask" in inputs
                                                         else inputs["input_ids"].numel())
        chunks = inputs.get("chunks")
        if chunks is None and self.graphed(inputs, num_items_in_batch):
            model.train()
            if self.graphs is None:
                self.graphs = PassGraphs(self.trainable())
            # Trainer's own pass (forward, loss, backward), without the note of the loss (training_step):
            # that note reads the last step's, which a recording would fix to one tensor.
            loss = self.graphs.run(self.prepare_inputs(inputs), num_items_in_batch,
                                    lambda batch, items: Trainer.training_step(self, model, batch, items))
            return self.note_loss(loss)
        if chunks is None:
            if not self.lockstep:
                return self.note_loss(super().training_step(model, inputs, num_items_in_batch))
            # One pass here, perhaps several on another process: this one must still take part in
            # counting them, or it leaves the others waiting.
            chunks = [inputs]
        # One optimizer step's samples in several forward/backward passes (PackCollator's token
        # budget). Gradients add up; each chunk's loss is already divided by the step's token count.
        total, passes = 0.0, self.passes(len(chunks))
        step_goes_on = not self.accelerator.sync_gradients  # Trainer's accumulation: more micro-batches follow
        for i in range(passes):
            last = i == passes - 1
            self.loss_weight = 1.0 if i < len(chunks) else 0.0
            with nullcontext() if last else self.accelerator.no_sync(model), self.kept_gathered(model, not last or step_goes_on):
                total = total + self.note_loss(super().training_step(model, chunks[min(i, len(chunks) - 1)], num_items_in_batch))
        self.loss_weight = 1.0
        return total

    def graphed(self, inputs, num_items_in_batch) -> bool:
        """Whether this pass is replayed from a CUDA graph: asked for, one packed row (its trained
        positions found by PackCollator, so the loss searches nothing on the device), on a GPU, one
        process, and the step's token count known (Trainer passes it)."""
        return (self.cuda_graphs and "trained_positions" in inputs and inputs["input_ids"].is_cuda
                and num_items_in_batch is not None and self.accelerator.num_processes == 1)

    def get_eval_dataloader(self, eval_dataset=None):
        # Each held-out sample on one process only (Trainer's sharding repeats some to fill batches).
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        return held_out_batches(dataset, self.data_collator, self.args.eval_batch_size,
                                self.args.process_index, self.args.world_size)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """Trainer.evaluate()'s loop: the held-out loss as chatlora defines it (evaluate/loss.py), which
        `chatlora eval` and merge report too, instead of Trainer's mean of the batches' mean losses."""
        model = self.evaluation_model()
        if self.preference is not None:
            return self.preference_evaluation(model, dataloader, metric_key_prefix)
        dataset = dataloader.dataset
        spare = self.data_collator([dataset[0]]) if self.lockstep and len(dataset) else None
        result = held_out_loss(model, dataloader, device=self.args.device, distributed=self.accelerator.num_processes > 1,
                               lockstep=self.lockstep, spare=spare)
        if self.args.fsdp:  # the model is sharded now; the monitor generates after this (on_evaluate)
            fsdp.register_generate(self.model)
        return EvalLoopOutput(predictions=None, label_ids=None, metrics={f"{metric_key_prefix}_loss": result.loss},
                              num_samples=len(dataset))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.preference is not None:
            return self.preference_step(model, inputs, return_outputs)
        # peft casts every LoRA layer's input to the adapter's float32: a copy of each activation,
        # kept for backward. Under bf16/fp16 autocast the LoRA matmuls run in half precision anyway,
        # so the copies are pure cost (a third of the step's memory on a 7B model).
        if self._tuner_layers is None:
            self._tuner_layers = walks.tuner_layers(self.model)
        with walks.no_input_casting(self._tuner_layers, active=self.args.bf16 or self.args.fp16):
            total, count = trained_token_loss(model, inputs)  # one pass: step_loss splits a step's chunks
        if num_items_in_batch is None:
            loss = total / count.clamp_min(1)
        else:
            loss = total / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks
                # (so it holds whatever number of samples each rank took: trainer/distributed/balance.py).
                loss = loss * self.accelerator.num_processes
        if self.loss_weight != 1.0:
            loss = loss * self.loss_weight
        return (loss, {}) if return_outputs else loss

    def note_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Notes whether `loss` is finite, on the device, for the guard (losses_finite)."""
        finite = torch.isfinite(loss.detach()).all()
        self.losses_finite = finite if self.losses_finite is None else self.losses_finite & finite
        return loss


class StepEvents(TrainerCallback):
    """Not an observer: how Trainer's loop hands the events of a step to the trainer, which acts on
    them itself (the guard, stop on a signal, FSDP2's set-up). The trainer adds it after every
    callback it is given, as the last."""

    def __init__(self, trainer: ChatTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.train_begins()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.before_optimizer_step(state)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.step_ends(control)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.train_ends()
