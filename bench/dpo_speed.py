"""chatlora's DPO step against TRL's DPOTrainer on the same random-weight model and the same random pairs:
tokens/s (chosen + rejected tokens, prompt included, per second of optimizer steps) and peak memory.

    python bench/dpo_speed.py --model-config PATH [--pairs 8] [--prompt 256] [--reply 256] [--steps 10] [--vary]

PATH: a model folder with config.json, or the config.json itself (e.g. Qwen1.5-7B's). The model is
built with random weights (bfloat16 on a GPU, float32 on the CPU) and LoRA r=16 on every linear layer;
both sides take the reference from the same weights with the adapter disabled, no gradient
checkpointing. chatlora: built as `chatlora train` builds it (varlen attention, Liger where installed),
one packed varlen row per step (data/collate.py PreferenceCollator,
model/preference.py). TRL: DPOTrainer.training_step on DataCollatorForPreference's padded batch of the
same token ids (TRL 1.16 has padding_free turned off in DPO: dpo_config.py says so); --liger asks it
for use_liger_kernel. The first --warmup steps of each are not timed. Prints one line per side; a
script that prints numbers, never a timed assertion (docs/benchmarks.md holds the figures).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from chatlora.config.preference import PreferenceConfig  # noqa: E402
from chatlora.data.collate import PreferenceCollator  # noqa: E402
from chatlora.data.render import IGNORE  # noqa: E402
from chatlora.model.preference import preference_loss  # noqa: E402


def build(path: str, device: str, dtype, chatlora: bool = False):
    """The random-weight model. chatlora's side is built as `chatlora train` builds it on a GPU (model/
    load.py, model.kernels=auto): varlen attention for the packed row and Liger's kernels where
    installed; TRL's side with sdpa (its --liger asks TRL itself)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    config = AutoConfig.from_pretrained(folder.parent if folder.name == "config.json" else folder)
    config._attn_implementation = "sdpa"
    if chatlora and device == "cuda":
        from chatlora.model.kernels import use_liger
        from chatlora.model.load import attention_for

        config._attn_implementation = attention_for(config, dtype) or "sdpa"
        line = use_liger(config.model_type, True, False, "auto")
        print(f"chatlora: attention {config._attn_implementation}; {line}", flush=True)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, config.vocab_size


def pairs(count: int, prompt: int, reply: int, vocab: int, seed: int, vary: bool = False) -> list[dict]:
    """Random pairs; with vary, each length is drawn from [n/4, n] as real preference sets vary (padding then
    costs a padded batch what it would cost on real data)."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, vocab, (n,), generator=g).tolist()  # noqa: E731
    size = lambda n: int(torch.randint(max(1, n // 4), n + 1, (1,), generator=g)) if vary else n  # noqa: E731
    out = []
    for _ in range(count):
        p, c, r = ids(size(prompt)), ids(size(reply)), ids(size(reply - reply // 4))
        out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return out


def peak(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU, allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"


def timed(step, batches, warmup: int, device: str) -> float:
    for batch in batches[:warmup]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        step(batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    ap.add_argument("--reply", type=int, default=256, help="chosen reply tokens (rejected: three quarters)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--liger", action="store_true", help="TRL: use_liger_kernel=True")
    ap.add_argument("--vary", action="store_true", help="lengths drawn from [n/4, n] per pair instead of fixed")
    ap.add_argument("--only", choices=("chatlora", "trl"), default=None)
    ap.add_argument("--share-prompt", action="store_true", help="chatlora: preference.share_prompt (each pair's prompt "
                    "through the model once); tokens/s still counts the prompt twice, the work both sides are given")
    a = ap.parse_args()
    from peft import LoraConfig, get_peft_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base, vocab = build(a.model_config, device, dtype, chatlora=a.only == "chatlora")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    steps = [pairs(a.pairs, a.prompt, a.reply, vocab, seed, a.vary) for seed in range(a.steps + a.warmup)]
    tokens = sum(len(p["prompt_ids"]) * 2 + len(p["chosen_ids"]) + len(p["rejected_ids"]) for s in steps[a.warmup:] for p in s)
    results = {}

    if a.only in (None, "chatlora"):
        model = get_peft_model(base, lora)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        share = None
        if a.share_prompt:  # the form recipes/train.py picks for the model's attention
            from chatlora.model import attention

            share = "varlen" if base.config._attn_implementation == attention.NAME else "mask"
            print(f"chatlora: prompts shared ({share})", flush=True)
        collate, settings = PreferenceCollator(share), PreferenceConfig(loss="sigmoid", beta=0.1)

        def features(step):
            return [{"input_ids": p["prompt_ids"] + p["chosen_ids"], "labels": [IGNORE] * len(p["prompt_ids"]) + p["chosen_ids"],
                     "rejected_input_ids": p["prompt_ids"] + p["rejected_ids"],
                     "rejected_labels": [IGNORE] * len(p["prompt_ids"]) + p["rejected_ids"]} for p in step]

        def chatlora_step(step):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(features(step)).items()}
            loss, _ = preference_loss(model, batch, settings)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = timed(chatlora_step, steps, a.warmup, device)
        results["chatlora"] = {"tokens_per_s": round(tokens / seconds, 1), "peak": peak(device)}
        print(f"chatlora DPO: {tokens / seconds:,.0f} tokens/s, peak {peak(device)}", flush=True)
        base = model.unload()
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()

    if a.only in (None, "trl"):
        import datasets
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from trl import DPOConfig, DPOTrainer
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        # TRL wants a tokenizer and a dataset to build; the timed steps use the same token ids as above.
        backend = Tokenizer(models.WordLevel({"<pad>": 0, "a": 1}, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="a")
        stub = datasets.Dataset.from_list([{"prompt": "a", "chosen": "a a", "rejected": "a"}])
        with tempfile.TemporaryDirectory() as out:
            args = DPOConfig(output_dir=out, beta=0.1, loss_type=["sigmoid"], bf16=device == "cuda", report_to=[],
                             use_cpu=device == "cpu", per_device_train_batch_size=a.pairs, learning_rate=1e-5,
                             use_liger_kernel=a.liger, gradient_checkpointing=False)
            trainer = DPOTrainer(model=base, args=args, train_dataset=stub, processing_class=tok, peft_config=lora)
            trainer.create_optimizer_and_scheduler(num_training_steps=a.steps + a.warmup)
            trainer.current_gradient_accumulation_steps = 1  # set by train(), which the timed steps bypass
            collate = DataCollatorForPreference(pad_token_id=0)

            def trl_step(step):
                batch = {k: v.to(device) for k, v in collate(step).items()}
                trainer.model.train()
                trainer.training_step(trainer.model, batch)
                trainer.optimizer.step()
                trainer.optimizer.zero_grad(set_to_none=True)

            seconds = timed(trl_step, steps, a.warmup, device)
        results["trl"] = {"tokens_per_s": round(tokens / seconds, 1), "peak": peak(device)}
        print(f"TRL DPOTrainer: {tokens / seconds:,.0f} tokens/s, peak {peak(device)}", flush=True)
    if len(results) == 2:
        print(f"speed-up: {results['chatlora']['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x")
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "pairs": a.pairs,
                      "prompt": a.prompt, "reply": a.reply, "vary": a.vary, "steps": a.steps, **results}))


if __name__ == "__main__":
    main()
