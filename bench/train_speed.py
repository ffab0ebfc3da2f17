"""Training speed on one GPU: the tutorial's recipe against chatlora, same card, same data.

    python bench/train_speed.py --tokenizer ../shared/data/qwen-tokenizer --data ../shared/data/huanhuan.json \
        --out bench/results/train_speed-h100.json

Variants, each in its own process (so peak memory is its own):
  tutorial        the tutorial as written: process_func, DataCollatorForSeq2Seq, Trainer, its arguments
  seed-semantics  chatlora with every hyperparameter of the recipe (16 samples per optimizer step,
                  LoRA dropout 0.1, lr 1e-4), packed into one forward pass per step
  seed-24gib      the preset as shipped until 2026-12-07: seed semantics with gradient checkpointing
  preset          the preset as shipped, no flag: the plan decides checkpointing, the autos graphs and Liger
  throughput      chatlora with 128 samples per step in passes of at most 8k tokens, LoRA dropout 0
  trl             TRL's SFTTrainer: packing (bfd, padding-free), Liger kernels, one 8k-token row per step
and more chatlora settings in CHATLORA_SETTINGS (compiled layers: *-compile-layers; CUDA graphs:
*-graphs; Liger's kernels: *-liger) and probes (the compiler's CPU overhead: *-compile-layers-cpp,
*-compile-layers-noguards; torch's fused RMSNorm: *-nativenorm).

All on the Qwen1.5-7B architecture with random bf16 weights (no model hub is reachable; speed and
memory equal the real model's) and the real Qwen tokenizer and huanhuan.json. Every variant logs its
loss at every step (logging_steps=1, the only change to the tutorial's arguments besides max_steps).
The first --warmup steps are not timed. MFU counts 4 x 7.1e9 FLOP per real token (forward and
input-gradient matmuls of the 7.1 B matmul parameters, no recompute) against 989 TFLOP/s (dense bf16
of an H100 SXM or H200).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import architectures
from meters import DEVICE, FLOP_PER_TOKEN, PEAK_FLOPS, Profile, StepMeter, SyncDebug, sync  # noqa: F401 (others import them from here)
import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
QWEN15_7B = dict(architectures.QWEN15_7B, bos_token_id=151643, eos_token_id=151645)
VARIANTS = ("tutorial", "seed-semantics", "seed-24gib", "throughput", "trl")
# --tiny: the same code on a 2-layer model, to check the script on a CPU before spending GPU time.
TINY = dict(QWEN15_7B, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)


def model_folder(tokenizer: Path, out: Path, dims: dict) -> Path:
    """Config + tokenizer of Qwen1.5-7B-Chat, no weights (chatlora builds them with model.random_init)."""
    import shutil

    from transformers import GenerationConfig, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    for f in tokenizer.iterdir():
        shutil.copy(f, out / f.name)
    Qwen2Config(**dims).save_pretrained(out)
    GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, bos_token_id=151643).save_pretrained(out)
    return out


def random_model(folder: Path):
    """Random bf16 weights drawn exactly as chatlora's model.random_init draws them (seed 42, then
    from_config on the device), so the tutorial and chatlora start from the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    set_seed(42)
    with torch.device(DEVICE):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.bfloat16)


def run_tutorial(folder: Path, data: Path, steps: int, work: Path, meter_steps: list):
    """The tutorial's code, verbatim where it can be (random weights instead of from_pretrained)."""
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False, trust_remote_code=True)
    ds = Dataset.from_list(json.loads(data.read_text("utf-8")))

    def process_func(example):
        MAX_LENGTH = 384
        instruction = tokenizer(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{example['instruction'] + example['input']}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
        response = tokenizer(f"{example['output']}", add_special_tokens=False)
        input_ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.pad_token_id]
        attention_mask = instruction["attention_mask"] + response["attention_mask"] + [1]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.pad_token_id]
        if len(input_ids) > MAX_LENGTH:
            input_ids, attention_mask, labels = input_ids[:MAX_LENGTH], attention_mask[:MAX_LENGTH], labels[:MAX_LENGTH]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    tokenized_id = ds.map(process_func, remove_columns=ds.column_names)
    model = random_model(folder)
    model.enable_input_require_grads()
    set_seed(42)  # as chatlora does before adding LoRA: the same initial adapter, for the loss curves
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        inference_mode=False, r=8, lora_alpha=32, lora_dropout=0.1)
    model = get_peft_model(model, config)
    args = TrainingArguments(output_dir=str(work / "tutorial"), per_device_train_batch_size=4, gradient_accumulation_steps=4,
                             logging_steps=1, num_train_epochs=3, save_steps=100, learning_rate=1e-4, save_on_each_node=True,
                             gradient_checkpointing=True, max_steps=steps, report_to="none")
    meter = StepMeter(per_step_batches=4)
    trainer = Trainer(model=model, args=args, train_dataset=tokenized_id,
                      data_collator=DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True), callbacks=[meter])
    trainer.train()
    return meter, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def run_chatlora(folder: Path, data: Path, steps: int, work: Path, overrides: list[str], probe: dict, warmup: int,
                 step_sync: bool = True):
    from chatlora.config import load_config
    from chatlora.recipes.train import train
    from chatlora.trainer.plot import read_metrics

    cfg = load_config("qwen1.5-7b-chat-huanhuan", [f"model.name={folder}", "model.random_init=true", f"data.train={data}",
                                                    f"training.max_steps={steps}", "training.logging_steps=1",
                                                    "training.save_strategy=no", f"output_dir={work / 'run'}", *overrides])
    per_step = 1 if cfg.data.batch_tokens else cfg.training.get("gradient_accumulation_steps", 1)
    meter = StepMeter(per_step_batches=per_step, step_sync=step_sync)
    # Profiled steps (the last 3) and the step whose syncs are listed (the one before) run slower:
    # StepMeter leaves them out.
    profile = [Profile(start=steps - 3)] if os.environ.get("BENCH_PROFILE") else []
    syncs = [SyncDebug(step=steps - 4 if profile else steps - 1)] if os.environ.get("BENCH_SYNC_DEBUG") else []
    meter.untimed_tail = (3 if profile else 0) + (1 if syncs else 0)
    if probe.get("cpp_wrapper"):
        import torch._inductor.config as inductor

        inductor.cpp_wrapper = True
    guards = [SkipGuards(after=warmup)] if probe.get("skip_guards") else []
    if probe.get("native_norm"):
        from transformers.models.qwen2 import modeling_qwen2

        def rms_norm(self, hidden_states):
            return torch.nn.functional.rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)

        modeling_qwen2.Qwen2RMSNorm.forward = rms_norm
    def echo(line: str) -> None:
        print(line)
        if line.startswith("cuda graphs:"):
            meter.notes.append(line)

    run = train(cfg, echo=echo, callbacks=[meter] + profile + syncs + guards)
    return meter, [r["loss"] for r in read_metrics(run.metrics) if "loss" in r]


def run_trl(folder: Path, data: Path, steps: int, work: Path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = json.loads(data.read_text("utf-8"))
    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["instruction"] + r["input"]}],
                             "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = random_model(folder)
    # One packed row of 8192 tokens per step: about the throughput variant's 128 samples.
    cuda = DEVICE == "cuda"
    args = SFTConfig(output_dir=str(work / "trl"), per_device_train_batch_size=1, gradient_accumulation_steps=1,
                     learning_rate=1e-4, num_train_epochs=3, max_steps=steps, logging_steps=1, save_strategy="no", bf16=cuda,
                     packing=True, packing_strategy="bfd", max_length=8192, use_liger_kernel=cuda, report_to="none",
                     gradient_checkpointing=False, use_cpu=not cuda)
    peft_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    meter = StepMeter(per_step_batches=1)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer, peft_config=peft_config, callbacks=[meter])
    trainer.train()
    return meter, [h["loss"] for h in trainer.state.log_history if "loss" in h]


# The recipe's 4 x 4 samples in one packed forward pass per step; no recompute.
SEED = ["data.batch_tokens=16384", "training.gradient_checkpointing=false"]
# 128 samples per step in passes of at most 8k tokens, LoRA dropout 0.
THROUGHPUT = ["training.per_device_train_batch_size=128", "training.gradient_accumulation_steps=1",
              "data.batch_tokens=8192", "training.gradient_checkpointing=false", "lora.dropout=0.0"]
# Each decoder layer compiled once with symbolic sizes (model.compile=layers), not the whole model.
LAYERS = ["model.compile=layers"]
# Each packed pass replayed from a CUDA graph recorded per padded shape (trainer/speed/graphs.py).
GRAPHS = ["model.cuda_graphs=true"]
# Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (model.kernels=liger, model/kernels.py).
LIGER = ["model.kernels=liger"]
CHATLORA_SETTINGS = {
    "seed-semantics": SEED,
    # The preset as shipped before its autos: gradient checkpointing on, as in the tutorial (a 24 GB card).
    "seed-24gib": ["training.gradient_checkpointing=true"],
    "seed-compile": [*SEED, "training.torch_compile=true"],
    "seed-compile-layers": [*SEED, *LAYERS],
    "seed-graphs": [*SEED, *GRAPHS],
    "seed-liger": [*SEED, *LIGER],
    "seed-graphs-liger": [*SEED, *GRAPHS, *LIGER],
    "seed-compile-layers-graphs": [*SEED, *LAYERS, *GRAPHS],
    "seed-24gib-compile-layers": LAYERS,
    "throughput": THROUGHPUT,
    "throughput-compile": [*THROUGHPUT, "training.torch_compile=true"],
    "throughput-compile-layers": [*THROUGHPUT, *LAYERS],
}
# Every variant above names its fast paths itself: the defaults' autos (model.cuda_graphs,
# model.kernels) are turned off first, so a variant means what it meant before they existed.
EAGER = ["model.cuda_graphs=false", "model.kernels=none"]
CHATLORA_SETTINGS = {variant: [*EAGER, *overrides] for variant, overrides in CHATLORA_SETTINGS.items()}
# The preset exactly as shipped, no flag: the plan and the autos choose.
CHATLORA_SETTINGS["preset"] = []
# Probes of torch.compile's CPU overhead per compiled layer call (about 2.2 ms per direction on a 7B
# layer, which bounds the seed step), bench-only until they measure faster:
#   -cpp       inductor's generated wrapper in C++ instead of Python (inductor config cpp_wrapper)
#   -noguards  after the untimed steps, dynamo checks only the guards that tell its compiled entries
#              apart (set_stance skip_guard_eval_unsafe: unsafe if a new kind of input came later)
#   -nativenorm  Qwen2's RMSNorm through torch's F.rms_norm, one fused CUDA kernel each way on torch >= 2.8
#              (eager Qwen2RMSNorm is about 8 kernels forward): what torch alone gives. Measured
#              (2026-12-05): 0.110 s per step against 0.123 for seed-graphs and 0.103 with Liger's
#              kernels (model.kernels=liger, which replaces RoPE and SwiGLU as well): not kept.
# Probe variants train as their base variant does.
PROBES = {f"{name}-{suffix}": probe for name in ("seed-compile-layers", "throughput-compile-layers")
          for suffix, probe in (("cpp", {"cpp_wrapper": True}), ("noguards", {"skip_guards": True}))}
PROBES["seed-graphs-nativenorm"] = {"native_norm": True}
CHATLORA_SETTINGS.update({variant: CHATLORA_SETTINGS[variant.rsplit("-", 1)[0]] for variant in PROBES})


class SkipGuards(TrainerCallback):
    def __init__(self, after: int):
        self.after = after

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.after:
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

    def on_train_end(self, args, state, control, **kwargs):
        torch.compiler.set_stance("default")  # whatever runs after training checks its guards again


def worker(a) -> dict:
    folder = model_folder(Path(a.tokenizer), Path(a.work) / "model", TINY if a.tiny else QWEN15_7B)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if a.variant == "tutorial":
        meter, losses = run_tutorial(folder, Path(a.data), a.steps, Path(a.work), [])
    elif a.variant == "trl":
        meter, losses = run_trl(folder, Path(a.data), a.steps, Path(a.work))
    else:
        meter, losses = run_chatlora(folder, Path(a.data), a.steps, Path(a.work), CHATLORA_SETTINGS[a.variant] + a.extra,
                                     PROBES.get(a.variant, {}), a.warmup, a.step_sync)
    cuda = DEVICE == "cuda"
    return {"variant": a.variant, "gpu": torch.cuda.get_device_name() if cuda else "cpu", "date": time.strftime("%Y-%m-%d"),
            "dynamo": compiled_graphs(),
            **meter.summary(a.warmup), "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0, "steps": a.steps, "warmup": a.warmup,
            "extra": a.extra, "step_sync": a.step_sync, "losses": losses, "torch": torch.__version__, "notes": meter.notes}


def compiled_graphs() -> dict:
    """What torch.compile did in this worker: forward graphs compiled and why each recompile happened.
    Every cached version of a compiled layer is a guard check per layer call until one matches, so
    many versions cost CPU time at every step, not only while compiling."""
    from torch._dynamo.utils import counters, guard_failures

    reasons = sorted({str(r).split("  #")[0][:160] for failures in guard_failures.values() for r in failures})
    return {"graphs": counters["stats"]["unique_graphs"], "frames": counters["frames"]["total"],
            "recompiles": sum(len(failures) for failures in guard_failures.values()), "reasons": reasons[:20]}


def run_worker(script: str, variant: str, a, steps: int, **env: str) -> subprocess.CompletedProcess:
    """`script --variant VARIANT` (its worker mode) in a fresh work folder, with the bench's common
    arguments from `a`; its output captured for result_of."""
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, script, "--variant", variant, "--work", work, "--tokenizer", a.tokenizer, "--data", a.data,
               "--steps", str(steps), "--warmup", str(a.warmup), *(["--tiny"] if a.tiny else []),
               "--step-sync" if a.step_sync else "--no-step-sync", "--extra", *a.extra]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def print_syncs(proc: subprocess.CompletedProcess) -> None:
    """The list a worker's SyncDebug callback printed, if any."""
    lines = proc.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("SYNCS"):
            rows = list(itertools.takewhile(lambda x: x.startswith("  "), lines[i + 1 :]))
            print("\n".join([line, *rows[:40]]), flush=True)


def print_profile(proc: subprocess.CompletedProcess) -> None:
    """The tables a worker's Profile callback printed, if any."""
    if "PROFILE" in proc.stdout:
        tail = proc.stdout[proc.stdout.index("PROFILE"):]
        print("\n".join(line for line in tail.splitlines() if not line.startswith(("RESULT ", "training:"))), flush=True)


def result_of(label: str, proc: subprocess.CompletedProcess) -> dict | None:
    """The JSON a worker process printed on its last `RESULT ` line; None (with the worker's output
    tails printed) when it failed or printed none."""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"{label}: FAILED (exit {proc.returncode})\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def write_results(path: str | None, results: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/qwen-tokenizer"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/huanhuan.json"))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (tutorial: a third of it); "
                   "-1: the preset's 3 epochs (chatlora variants)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--extra", nargs="*", default=[], help="extra chatlora overrides for the chatlora variants")
    p.add_argument("--step-sync", action=argparse.BooleanOptionalAction, default=True,
                   help="wait for the GPU at each step's end, to time each step (default); --no-step-sync times a run "
                   "as a user's goes, the host queueing ahead: then only the whole run's time is exact (use --warmup 0)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model: check the script itself, on a CPU too")
    p.add_argument("--same-steps", action="store_true", help="the tutorial runs --steps too (to compare loss curves)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of 3 steps (chatlora variants)")
    p.add_argument("--sync-debug", action="store_true", help="list where one step makes the host wait for the GPU "
                   "(chatlora variants; the step is left out of the timing)")
    a = p.parse_args()
    if a.variant:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return
    results = []
    for variant in a.variants.split(","):
        # The tutorial's steps are slow: a third as many, unless the loss curves are to be compared
        # (the learning-rate schedule depends on max_steps, so curves need equal step counts).
        steps = max(a.warmup + 5, a.steps // 3) if variant == "tutorial" and not a.same_steps else a.steps
        env = {**({"BENCH_PROFILE": "1"} if a.profile else {}), **({"BENCH_SYNC_DEBUG": "1"} if a.sync_debug else {})}
        proc = run_worker(__file__, variant, a, steps, **env)
        print_syncs(proc)
        if a.profile:
            print_profile(proc)
        r = result_of(variant, proc)
        if r is None:
            continue
        results.append(r)
        write_results(a.out, results)  # after every variant: a run stopped by a timeout keeps what it measured
        print(f"{variant:15s} {r['s_per_step']:.3f} s/step  {r['real_tok_s']:8,.0f} real tok/s  {r['trained_tok_s']:8,.0f} trained tok/s  "
              f"MFU {100 * r['mfu']:5.1f}%  peak {r['peak_gib']:.1f} GiB  wall {r['train_wall_s']:.0f} s  losses {[round(x, 3) for x in r['losses'][:8]]}", flush=True)
        for note in r.get("notes", []):
            print(f"  {note}  (median step {r['median_s_per_step']:.3f} s)", flush=True)
        if r["dynamo"]["graphs"]:
            print(f"  compiled: {r['dynamo']['graphs']} graphs, {r['dynamo']['recompiles']} recompiles: {r['dynamo']['reasons'][:5]}", flush=True)
    base = next((r for r in results if r["variant"] == "tutorial"), None)
    for r in results:
        if base:
            r["speedup_vs_tutorial"] = r["real_tok_s"] / base["real_tok_s"]
    write_results(a.out, results)
    print("\nvariant          s/step  real tok/s  trained tok/s   MFU  peak GiB  x tutorial")
    for r in results:
        print(f"{r['variant']:15s} {r['s_per_step']:7.3f} {r['real_tok_s']:11,.0f} {r['trained_tok_s']:13,.0f} {100 * r['mfu']:5.1f}% "
              f"{r['peak_gib']:8.1f} {r.get('speedup_vs_tutorial', 0):8.1f}x")


if __name__ == "__main__":
    main()
