"""The memory plan against the GPU: predicted and measured peak memory and tokens/s, per setting.

    python bench/plan_check.py --tokenizer ../shared/data/qwen-tokenizer --data ../shared/data/huanhuan.json \
        --out bench/results/plan_check-h100.json

Variants, each in its own process (so its peak is its own), a few real training steps each on the
Qwen1.5-7B architecture (random bf16 weights built from its config: memory and speed equal the real
model's) with the real Qwen tokenizer and huanhuan.json, through `chatlora.recipes.train.train` with
the qwen1.5-7b-chat-huanhuan preset (which prints the plan before loading weights):

  seed-ckpt     the preset as shipped: 16 samples per step in one pass of <= 16,384 tokens, LoRA
                dropout 0.1, gradient checkpointing on
  seed-nockpt   the same without gradient checkpointing
  throughput    128 samples per step in passes of <= 8,192 tokens, LoRA dropout 0, no checkpointing
                (bench/train_speed.py's throughput variant)
  4bit-seed     the preset as shipped on a 4-bit NF4 base (model.quantize=nf4; needs bitsandbytes)
  4bit-nockpt   (not run by default) the 4-bit base without checkpointing

Measured: `torch.cuda.max_memory_allocated()` from the start of training (after the model is built:
the 4-bit variant builds bf16 weights first and quantizes them, a peak no real 4-bit load has), which
is what the plan predicts; `max_memory_reserved()` beside it. Also the largest forward pass the run
met and the plan's peak for exactly that pass (`predicted_peak_at_seen_gib`), which separates the
formulas' error from the batching replay's. Tokens/s over the steps after --warmup.

--tiny runs a 2-layer model of the same vocabulary, on a CPU too: it checks the script, not the plan
(on a CPU, memory is reported as null and the 4-bit variant, which trains on CUDA only, is planned
but not run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import QWEN15_7B, TINY, StepMeter, model_folder, result_of, run_worker, write_results  # noqa: E402

VARIANTS = {
    "seed-ckpt": ["training.gradient_checkpointing=true"],
    "seed-nockpt": ["training.gradient_checkpointing=false"],
    "throughput": ["training.per_device_train_batch_size=128", "training.gradient_accumulation_steps=1",
                   "data.batch_tokens=8192", "training.gradient_checkpointing=false", "lora.dropout=0.0"],
    "4bit-seed": ["model.quantize=nf4", "training.gradient_checkpointing=true"],
    "4bit-nockpt": ["model.quantize=nf4", "training.gradient_checkpointing=false"],
}
DEFAULT = "seed-ckpt,seed-nockpt,throughput,4bit-seed"
CUDA = torch.cuda.is_available()
GIB = 2**30


class PassRecorder(TrainerCallback):
    """Records (positions, trained tokens) of every forward pass the collator builds, and resets the
    peak-memory counter when training starts."""

    def __init__(self):
        self.passes: list[tuple[int, int]] = []

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        collate = loader.collate_fn

        def recording(features):
            batch = collate(features)
            for row in batch.get("chunks", [batch]):
                self.passes.append((row["input_ids"].numel(), int((row["labels"][:, 1:] != -100).sum())))
            return batch

        loader.collate_fn = recording
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()


def worker(a) -> dict:
    from chatlora.config import load_config
    from chatlora.plan.memory import estimate
    from chatlora.plan.entry import plan_for, samples_of, worst_case
    from chatlora.model.tokenized import check_data
    from chatlora.recipes.train import train
    from chatlora.trainer.plot import read_metrics

    folder = model_folder(Path(a.tokenizer), Path(a.work) / "model", TINY if a.tiny else QWEN15_7B)
    overrides = [f"model.name={folder}", "model.random_init=true", f"data.train={a.data}", f"training.max_steps={a.steps}",
                 "training.logging_steps=1", "training.save_strategy=no", f"output_dir={Path(a.work) / 'run'}",
                 *VARIANTS[a.variant], *a.extra]
    cfg = load_config("qwen1.5-7b-chat-huanhuan", overrides)
    quant = "4bit" if cfg.model.quantize == "nf4" else "bf16"
    # The plan exactly as `chatlora plan` makes it for this config on this machine.
    checked = check_data(cfg, echo=lambda _line: None)
    samples = samples_of(checked.data) if checked else worst_case(cfg)
    cfg, plan = plan_for(cfg, checked.source, samples, echo=lambda _line: None)
    out = {"variant": a.variant, "gpu": torch.cuda.get_device_name() if CUDA else "cpu", "date": time.strftime("%Y-%m-%d"),
           "quant": quant, "gradient_checkpointing": plan.setup.checkpointing, "batch_tokens": plan.batching.budget,
           "samples_per_step": plan.batching.samples_per_step, "lora_dropout": cfg.lora.dropout,
           "predicted_peak_gib": plan.memory.peak / GIB, "predicted_card_gib": plan.memory.card_need / GIB,
           "predicted_largest_pass": [plan.stats.largest.tokens, plan.stats.largest.trained],
           "predicted_tok_s": plan.speed.real_tokens_per_s if plan.speed else None,
           "steps": a.steps, "warmup": a.warmup, "tiny": a.tiny, "overrides": VARIANTS[a.variant] + a.extra,
           "torch": torch.__version__}
    import transformers

    out["transformers"] = transformers.__version__
    if quant == "4bit":
        try:
            import bitsandbytes

            out["bitsandbytes"] = bitsandbytes.__version__
        except ImportError:
            out["bitsandbytes"] = None
    if quant == "4bit" and not CUDA:
        return {**out, "skipped": "4-bit training needs CUDA", "peak_gib": None, "peak_reserved_gib": None, "real_tok_s": None,
                "s_per_step": None, "largest_pass_seen": None, "predicted_peak_at_seen_gib": None, "losses": []}
    meter, passes = StepMeter(per_step_batches=1), PassRecorder()
    run = train(cfg, echo=print, callbacks=[passes, meter])
    seen = max(passes.passes) if passes.passes else (0, 0)
    at_seen = max(estimate(plan.arch, plan.setup, *p).peak for p in (seen, max(passes.passes, key=lambda p: p[1])))
    summary = meter.summary(a.warmup)
    peak = torch.cuda.max_memory_allocated() / GIB if CUDA else None
    return {**out, "peak_gib": peak, "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if CUDA else None,
            "error_pct": 100 * (out["predicted_peak_gib"] / peak - 1) if peak else None,
            "largest_pass_seen": list(seen), "predicted_peak_at_seen_gib": at_seen / GIB,
            "real_tok_s": summary["real_tok_s"], "s_per_step": summary["s_per_step"], "trained_tok_s": summary["trained_tok_s"],
            "losses": [r["loss"] for r in read_metrics(run.metrics) if "loss" in r]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = Path(__file__).resolve().parents[1]
    p.add_argument("--tokenizer", default=str(root.parent / "shared/data/qwen-tokenizer"), help="the Qwen tokenizer folder")
    p.add_argument("--data", default=str(root.parent / "shared/data/huanhuan.json"), help="huanhuan.json")
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated, of: {', '.join(VARIANTS)} (default {DEFAULT})")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per variant (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    p.add_argument("--out", default=os.path.join(os.environ["OUT"], "plan_check.json") if os.environ.get("OUT") else None,
                   help="JSON file for the results (default $OUT/plan_check.json when $OUT is set)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: check the script itself, on a CPU too")
    p.add_argument("--extra", nargs="*", default=[], help="extra chatlora overrides for every variant")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.variant:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    results = []
    for variant in a.variants.split(","):
        if variant not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        started = time.time()
        proc = run_worker(__file__, variant, a, a.steps)
        out_lines = proc.stdout.splitlines()
        start = next((i for i, line in enumerate(out_lines) if line.startswith("plan for")), len(out_lines))
        end = next((i for i in range(start + 1, len(out_lines)) if not out_lines[i].startswith("  ")), len(out_lines))
        plan_lines = out_lines[start:end]
        r = result_of(variant, proc)
        if r is None:
            continue
        r["wall_s"] = time.time() - started
        results.append(r)
        print("\n".join(plan_lines), flush=True)
        fmt = lambda x, f: "null" if x is None else format(x, f)  # noqa: E731
        print(f"{variant:12s} {r['quant']} ckpt={r['gradient_checkpointing']}: peak {fmt(r['peak_gib'], '.2f')} GiB "
              f"(predicted {r['predicted_peak_gib']:.2f}, at the largest pass seen {fmt(r['predicted_peak_at_seen_gib'], '.2f')}; "
              f"error {fmt(r.get('error_pct'), '+.1f')}%), {fmt(r['real_tok_s'], ',.0f')} real tok/s "
              f"(predicted {fmt(r['predicted_tok_s'], ',.0f')}), wall {r['wall_s']:.0f} s", flush=True)
    write_results(a.out, results)
    if a.out:
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
