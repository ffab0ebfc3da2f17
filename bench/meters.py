"""The step meters of the training benches (bench/train_speed.py and the scripts that reuse it):
per-step wall time and tokens (StepMeter), torch profiler tables of chosen steps (Profile), and where
the step waits on the GPU (SyncDebug). Apart from train_speed.py only to keep that script short."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from transformers import TrainerCallback

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOP_PER_TOKEN = 4 * 7.1e9  # the Qwen1.5-7B's 7.1e9 weights: forward 2N + backward 2N (frozen base)
PEAK_FLOPS = 989e12  # dense bf16 of an H100 SXM or H200


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class StepMeter(TrainerCallback):
    """Per-step wall time (after a device sync) and the real/trained tokens of each step, counted on
    the CPU as batches are collated, so measuring adds no device sync of its own."""

    def __init__(self, per_step_batches: int, step_sync: bool = True):
        self.per_step_batches = per_step_batches
        self.step_sync = step_sync
        """False: no device sync at step ends, as in a user's run (the host may queue the next
        steps while the GPU runs this one): only times from the start to the end are exact."""
        self.calls: list[tuple[int, int]] = []
        self.times: list[float] = []
        self.untimed_tail = 0
        self.notes: list[str] = []
        self.queue = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        # accelerate's DataLoaderShard delegates iteration to the DataLoader it wraps.
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        collate = loader.collate_fn
        # Data-loader workers (training.dataloader_num_workers) collate in their own processes: their
        # counts come back through a queue, in the order of the batches (one worker; with more, a
        # step's count may swap with its neighbour's).
        if loader.num_workers:
            import multiprocessing

            self.queue = multiprocessing.get_context(loader.multiprocessing_context).SimpleQueue()
        note = self.calls.append if not loader.num_workers else self.queue.put

        def counting(features):
            real = sum(len(f["input_ids"]) for f in features)
            if "labels" in features[0]:
                trained = sum(sum(1 for t in f["labels"] if t != -100) for f in features)
            else:  # TRL prompt-completion rows carry a completion mask instead of labels
                trained = sum(sum(f.get("completion_mask", f["input_ids"])) for f in features)
            note((real, trained))
            return collate(features)

        loader.collate_fn = counting
        sync()
        self.times.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_sync:
            sync()
        self.times.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        sync()
        self.times[-1] = time.perf_counter()  # the last step's end, once the GPU has run it

    def summary(self, warmup: int) -> dict:
        while self.queue is not None and not self.queue.empty():
            self.calls.append(self.queue.get())
        steps = len(self.times) - 1 - self.untimed_tail
        total = self.times[-1] - self.times[0]
        per = self.per_step_batches
        tokens = [tuple(map(sum, zip(*self.calls[i * per : (i + 1) * per]))) for i in range(steps)]
        seconds = self.times[steps] - self.times[warmup]
        real = sum(t[0] for t in tokens[warmup:])
        trained = sum(t[1] for t in tokens[warmup:])
        step_s = [b - a for a, b in zip(self.times[warmup:steps], self.times[warmup + 1 : steps + 1])]
        return {"steps_timed": steps - warmup, "s_per_step": seconds / (steps - warmup), "real_tok_s": real / seconds,
                # The median leaves out the slow steps that record a CUDA graph (*-graphs variants).
                "median_s_per_step": sorted(step_s)[len(step_s) // 2], "step_ms": [round(1e3 * t, 1) for t in step_s],
                "trained_tok_s": trained / seconds, "mfu": real / seconds * FLOP_PER_TOKEN / PEAK_FLOPS,
                "real_tokens_per_step": real / (steps - warmup), "train_wall_s": total}


class Profile(TrainerCallback):
    """--profile: torch.profiler over steps [start, start + count), summary printed at the end."""

    def __init__(self, start: int, count: int = 3):
        self.start, self.count, self.prof = start, count, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.start:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step == self.start + self.count:
            sync()
            self.prof.__exit__(None, None, None)
            events = self.prof.key_averages()
            # Only the kernels themselves: an aten op's self device time is its kernels' time again, and
            # a user annotation (DDP's forward, say) spans kernels already counted.
            kernels = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
            gpu = sum(e.self_device_time_total for e in kernels) / 1e3 / self.count
            print(f"PROFILE per step: GPU kernel time {gpu:.1f} ms, kernels {sum(e.count for e in kernels) // self.count}")
            print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
            print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
            self.prof = None


class SyncDebug(TrainerCallback):
    """BENCH_SYNC_DEBUG=1: where step `step` makes the host wait for the GPU. Each such wait lets the
    GPU run dry while the host then queues the next kernels; listed by call stack, with counts. The
    window is on_step_begin to on_step_end: Trainer's logging after the step (loss.item()) is outside."""

    def __init__(self, step: int):
        self.step, self.seen, self.caught, self.mode = step, {}, None, 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step and DEVICE == "cuda":
            import traceback
            import warnings

            self.caught = warnings.catch_warnings()  # restores filters and showwarning at the step's end
            self.caught.__enter__()
            original = warnings.showwarning

            def note(message, category, filename, lineno, file=None, line=None):
                if "called a synchronizing CUDA operation" not in str(message):
                    return original(message, category, filename, lineno, file, line)
                frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename][-6:]
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
                self.seen[where] = self.seen.get(where, 0) + 1

            warnings.showwarning = note
            warnings.simplefilter("always")
            self.mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")

    def on_step_end(self, args, state, control, **kwargs):
        if self.caught is not None and state.global_step == self.step + 1:
            torch.cuda.set_sync_debug_mode(self.mode)
            self.caught.__exit__(None, None, None)
            self.caught = None
            print(f"SYNCS in step {self.step + 1}: {sum(self.seen.values())}")
            for where, n in sorted(self.seen.items(), key=lambda kv: -kv[1]):
                print(f"  {n:4d}x {where}")
