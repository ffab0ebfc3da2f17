"""Multi-GPU scaling of chatlora's throughput mode on one host: 1, 2, 4 ... GPUs, DDP and FSDP2.

    python bench/scale_speed.py --gpus 1,2,4 --strategies ddp,fsdp2 \
        --out bench/results/scale_speed-h100-$(date +%F).json

Each point is the `throughput` variant of bench/train_speed.py (the Qwen1.5-7B architecture with
random bf16 weights, the real Qwen tokenizer and huanhuan.json; 128 samples per optimizer step in
passes of at most 8,192 tokens, LoRA dropout 0) launched as `torchrun --nproc-per-node N`, exactly as
a user launches chatlora. By default every GPU keeps the one-GPU work per step (weak scaling:
distributed.samples_per_step = 128 x N, the usual measure of a data-parallel engine); --global-batch
128 keeps the step instead (strong scaling: each GPU gets 128 / N samples, smaller kernels).

real tok/s counts the non-padding tokens of all processes. scaling efficiency = tok/s(N) / (N x tok/s(1)),
against the one-GPU run of the same invocation (one process has no DDP or FSDP wrapper, so it is the
baseline of both strategies). The issue's target: at least 90% at 4 GPUs, for both.

--tiny runs the same code on a 2-layer model, on CPU processes too (DDP only: accelerate shards on
GPUs only), to check the script before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_speed import (  # noqa: E402
    CHATLORA_SETTINGS, FLOP_PER_TOKEN, PEAK_FLOPS, QWEN15_7B, ROOT, TINY, Profile, StepMeter, model_folder, print_profile, result_of,
    write_results)


def worker(a) -> None:
    """One process of a torchrun launch: train, then rank 0 prints the summed numbers."""
    started = time.perf_counter()
    import torch
    import torch.distributed as dist

    from chatlora.config import load_config
    from chatlora.recipes.train import train

    overrides = [*CHATLORA_SETTINGS["throughput"], f"model.name={a.model}", "model.random_init=true", f"data.train={a.data}",
                 f"training.max_steps={a.steps}", "training.logging_steps=1", "training.save_strategy=no",
                 f"output_dir={a.work}/run", f"distributed.strategy={a.strategy}", f"distributed.samples_per_step={a.samples}",
                 "training.per_device_train_batch_size=128", *a.extra]  # the micro-batch limit; batch_tokens packs the share
    cfg = load_config("qwen1.5-7b-chat-huanhuan", overrides)
    meter = StepMeter(per_step_batches=1)  # data.batch_tokens: one collated batch per optimizer step
    # --profile: the last 3 steps of rank 0 under torch.profiler (left out of the timing); the time it
    # spends in NCCL kernels is the time it waits for the others.
    rank0 = int(os.environ.get("RANK", "0")) == 0
    profile = [Profile(start=a.steps - 3)] if a.profile and rank0 else []
    meter.untimed_tail = 3 if a.profile else 0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(cfg, echo=print if rank0 else (lambda _line: None), callbacks=[meter, *profile])
    mine = meter.summary(a.warmup)
    # Where a point's wall time goes: loading and wrapping the model (random weights, built on each GPU)
    # against the training itself.
    mine["setup_s"] = meter.times[0] - started
    mine["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    everyone = [mine]
    if dist.is_initialized():
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    if rank0:
        gpus = len(everyone)
        seconds = mine["s_per_step"] * mine["steps_timed"]  # steps end together: DDP/FSDP synchronize them
        real = sum(r["real_tokens_per_step"] for r in everyone) * mine["steps_timed"]
        print("RESULT " + json.dumps({
            "variant": "throughput", "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpus": gpus, "strategy": a.strategy, "date": time.strftime("%Y-%m-%d"), "samples_per_step": a.samples,
            "s_per_step": mine["s_per_step"], "real_tok_s": real / seconds,
            "trained_tok_s": sum(r["trained_tok_s"] for r in everyone),
            "mfu_per_gpu": real / seconds / gpus * FLOP_PER_TOKEN / PEAK_FLOPS,
            "peak_gib_max": max(r["peak_gib"] for r in everyone), "steps": a.steps, "warmup": a.warmup,
            "setup_s_max": max(r["setup_s"] for r in everyone), "train_wall_s": mine["train_wall_s"], "extra": a.extra,
            "torch": torch.__version__}), flush=True)


def launch(a, gpus: int, strategy: str, work: Path, model: Path) -> dict | None:
    samples = a.global_batch or a.per_gpu * gpus
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus), __file__, "--worker",
           "--strategy", strategy, "--samples", str(samples), "--steps", str(a.steps), "--warmup", str(a.warmup),
           "--work", str(work), "--model", str(model), "--data", a.data, *(["--profile"] if a.profile else []),
           "--extra", *a.extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    # torchrun gives each of several processes one CPU thread (OMP_NUM_THREADS=1) and one process all
    # of them: the host's cores shared out instead, so 1 and N processes differ only in N.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if a.profile:
        print(f"--- {strategy} x{gpus}, rank 0:")
        print_profile(proc)
    return result_of(f"{strategy} x{gpus}", proc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/qwen-tokenizer"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/huanhuan.json"))
    p.add_argument("--gpus", default="1,2,4", help="process counts to measure; 1 is the baseline and always runs")
    p.add_argument("--strategies", default="ddp,fsdp2")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--per-gpu", type=int, default=128, help="samples per GPU per optimizer step (weak scaling; default 128)")
    p.add_argument("--global-batch", type=int, help="samples per optimizer step whatever the GPUs (strong scaling)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: check the script, on CPU processes too")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of rank 0's last 3 steps "
                   "(where a second process's per-step cost goes: NCCL waits, host syncs)")
    p.add_argument("--extra", nargs="*", default=[], help="chatlora overrides for every point (recorded in the JSON), "
                   "e.g. training.fsdp_config.reshard_after_forward=false")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strategy", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    counts = sorted({1, *(int(n) for n in a.gpus.split(","))})
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = model_folder(Path(a.tokenizer), Path(tmp) / "model", TINY if a.tiny else QWEN15_7B)
        base = launch(a, 1, "ddp", Path(tmp) / "x1", model)
        if base is None:
            sys.exit(1)
        print(f"one GPU  {base['real_tok_s']:10,.0f} real tok/s  {base['s_per_step']:.3f} s/step  "
              f"peak {base['peak_gib_max']:.1f} GiB", flush=True)
        for strategy in a.strategies.split(","):
            # One GPU is the same run for both strategies (no wrapper): recorded once for each.
            results.append({**base, "strategy": strategy, "scaling_efficiency": 1.0,
                            "note": "one GPU: no DDP/FSDP wrapper; the baseline of every strategy"})
            for gpus in counts[1:]:
                r = launch(a, gpus, strategy, Path(tmp) / f"{strategy}-x{gpus}", model)
                if r is None:
                    continue
                r["scaling_efficiency"] = r["real_tok_s"] / (gpus * base["real_tok_s"])
                results.append(r)
                write_results(a.out, results)  # after every point: a run stopped by a timeout keeps what it measured
                print(f"{strategy:6s} x{gpus}  {r['real_tok_s']:10,.0f} real tok/s  {r['s_per_step']:.3f} s/step  "
                      f"efficiency {100 * r['scaling_efficiency']:5.1f}%  peak {r['peak_gib_max']:.1f} GiB  "
                      f"set-up {r['setup_s_max']:.0f} s, training {r['train_wall_s']:.0f} s", flush=True)
    write_results(a.out, results)
    print("\nstrategy  GPUs  samples/step  s/step  real tok/s  efficiency  MFU/GPU  peak GiB")
    for r in results:
        print(f"{r['strategy']:8s} {r['gpus']:5d} {r['samples_per_step']:13d} {r['s_per_step']:7.3f} {r['real_tok_s']:11,.0f} "
              f"{100 * r['scaling_efficiency']:10.1f}% {100 * r['mfu_per_gpu']:7.1f}% {r['peak_gib_max']:8.1f}")


if __name__ == "__main__":
    main()
