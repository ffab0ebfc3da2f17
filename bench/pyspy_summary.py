"""Where a training step's CPU time goes, from a py-spy profile of a bench worker.

    py-spy record -r 200 --nonblocking --format raw -o seed.pyspy -- \
        python bench/train_speed.py --variant seed-compile-layers --work /tmp/w --steps 100 --warmup 20 ...
    python bench/pyspy_summary.py seed.pyspy            # or seed.pyspy.xz

Counts the samples of the thread that runs Trainer's loop (frames under Trainer._run_epoch), leaves
out those spent compiling (dynamo, AOTAutograd, inductor), and sorts the rest into what the step does
(the compiled layers, clipping, the optimizer, ...), by the first matching frame. A recipe step is
bound by this thread's CPU time, so its shares say what a cut would gain. The backward pass runs on
autograd's own thread and is not in these shares.
"""

from __future__ import annotations

import argparse
import collections
import lzma
from pathlib import Path

COMPILING = ("convert_frame", "compile_fx", "async_compile", "_inductor/graph.py", "aot_autograd.py:", "select_algorithm")
# (frame substring, category), first match wins: callees before their callers.
CATEGORIES = (
    ("compile_wrapper", "compiled decoder layers, forward (dynamo's call, guards, the kernels' launches)"),
    ("_engine_run_backward", "backward (this thread's part)"),
    ("_clip_grad_norm", "gradient clipping"),
    ("on_pre_optimizer_step", "non-finite guard"),
    ("optimizer.py", "optimizer step"),
    ("lr_scheduler", "learning-rate schedule"),
    ("floating_point_ops", "Trainer's FLOP count"),
    ("get_batch_samples", "data loading and collation"),
    ("zero_grad", "zero_grad"),
    ("Module.train ", "model.train()"),
    ("input_dtype_casting", "peft's input-casting switch"),
    ("no_input_casting", "peft's input-casting switch"),
    ("_chunk_loss", "output layer and loss"),
    ("call_event", "callbacks"),
    ("Model.forward", "model forward outside the layers (embedding, rotary, mask)"),
    ("compute_loss", "compute_loss, other"),
    ("training_step", "training_step, other"),
)


def read(path: Path) -> list[tuple[list[str], int]]:
    opener = lzma.open if path.suffix == ".xz" else open
    rows = []
    with opener(path, "rt") as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if stack and count.isdigit():
                rows.append((stack.split(";"), int(count)))
    return rows


def category(stack: list[str]) -> str:
    loop = max(i for i, frame in enumerate(stack) if "Trainer._run_epoch" in frame)
    below = stack[loop + 1:]
    for key, name in CATEGORIES:
        if any(key in frame for frame in below):
            return name
    return "other: " + (below[0].split(" (")[0] if below else "the loop itself")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("profile", type=Path, help="py-spy --format raw output (plain or .xz)")
    a = p.parse_args()
    loop = [(s, n) for s, n in read(a.profile) if any("Trainer._run_epoch" in f for f in s)]
    steady = [(s, n) for s, n in loop if not any(k in f for f in s for k in COMPILING)]
    total = sum(n for _, n in steady)
    print(f"{a.profile.name}: {sum(n for _, n in loop)} samples in the training loop, {total} outside compiling")
    shares = collections.Counter()
    for stack, n in steady:
        shares[category(stack)] += n
    for name, n in shares.most_common():
        print(f"{100 * n / max(total, 1):5.1f}%  {n:5d}  {name}")


if __name__ == "__main__":
    main()
