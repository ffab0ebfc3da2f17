"""What torch.compile's guards cost per compiled decoder layer call (`model.compile=layers`).

    python bench/guard_cost.py                  # CPU, or the GPU when there is one
    python bench/guard_cost.py --device cpu --backward

A model with the structure of Qwen1.5-7B (32 decoder layers, chatlora's LoRA on every projection with
dropout 0.1, as the recipe trains it) but 64 wide, so that the host's work per call, not arithmetic,
sets the time. Its layers are compiled as chatlora compiles them, then one packed row is run through
the model (forward only, or with --backward forward and backward) with guards checked, and again
under torch's unsafe stance that checks only the guards telling cached versions apart
(skip_guard_eval_unsafe): the difference over 32 layer calls is what checking the guards costs per
call. Each compiled entry's guards are counted by kind, and each of these guard filters is timed in a
process of its own (a filter drops guards when the layer compiles):
  none        every guard (chatlora's setting)
  structural  drops the guards on the types and attribute dictionaries of the layer's modules
  nn_modules  drops every guard on the layer's modules (torch.compiler.skip_guard_on_all_nn_modules_unsafe)
Filters are probes, not settings: a guard dropped is a change torch no longer notices (a hook added
after compiling, the KV cache's layer index in generation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STRUCTURAL = {"TYPE_MATCH", "NOT_PRESENT_IN_GENERIC_DICT", "DICT_KEYS_MATCH", "DICT_NOT_CONTAINS", "HASATTR",
              "SEQUENCE_LENGTH", "DUPLICATE_INPUT", "CLOSURE_MATCH", "ID_MATCH", "EMPTY_NN_MODULE_HOOKS_DICT"}


def guard_filter(name: str, kinds: Counter):
    import torch

    def count(entries):  # every filter also counts what it is shown, and what it keeps
        kinds.update(e.guard_type for e in entries)
        kept = keep(entries)
        kinds["(kept)"] += sum(kept)
        return kept

    if name == "none":
        keep = lambda entries: [True] * len(entries)  # noqa: E731
    elif name == "structural":
        keep = lambda entries: [not (e.orig_guard.source.is_unspecialized_nn_module() and e.guard_type in STRUCTURAL)  # noqa: E731
                                for e in entries]
    elif name == "nn_modules":
        keep = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    else:
        raise SystemExit(f"unknown filter {name!r}")
    return count


def measure(a) -> dict:
    import torch
    import torch._dynamo as dynamo
    from transformers import AutoModelForCausalLM, Qwen2Config

    from architectures import QWEN15_7B
    from chatlora.config.schema import LoraSettings
    from chatlora.model.layers import compile_layers, decoder_layers
    from chatlora.model.lora import add_lora
    from chatlora.trainer.speed import walks

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dims = dict(QWEN15_7B, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128, vocab_size=1000)
    config = Qwen2Config(**{k: v for k, v in dims.items() if k not in ("architectures", "model_type")})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_config(config), LoraSettings(r=8, alpha=32, dropout=0.1)).to(device)
    kinds: Counter = Counter()
    compile_layers(model)  # chatlora's own compile, then the same again with the filter under test
    for layer in decoder_layers(model):
        layer.compile(dynamic=True, options={"guard_filter_fn": guard_filter(a.filter, kinds)})
    model.train()
    tuner = walks.tuner_layers(model)
    lengths = [3, 5]  # one packed row of two samples: the tensors are tiny, the calls are not
    ids = torch.randint(0, 1000, (1, sum(lengths)), device=device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)

    def step():
        with walks.no_input_casting(tuner):  # as ChatTrainer runs each pass
            out = model(input_ids=ids, position_ids=positions, use_cache=False)
            if a.backward:
                out.logits.float().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    def seconds(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            step()
        return (time.perf_counter() - start) / n

    for _ in range(3):
        step()
    checked, skipped = [], []
    for _ in range(a.rounds):
        torch.compiler.set_stance("default")
        checked.append(seconds(a.calls))
        torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
        skipped.append(seconds(a.calls))
    torch.compiler.set_stance("default")
    layers = len(decoder_layers(model))
    return {"filter": a.filter, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "backward": a.backward, "layers": layers, "compiled_versions": dynamo.utils.counters["stats"]["unique_graphs"],
            "guards": sum(kinds.values()) - kinds["(kept)"], "kept": kinds.pop("(kept)"), "kinds": dict(kinds.most_common()),
            "pass_ms": 1e3 * min(checked), "pass_ms_unsafe_skip": 1e3 * min(skipped),
            "guard_ms_per_call": 1e3 * (min(checked) - min(skipped)) / layers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: the GPU when there is one")
    p.add_argument("--backward", action="store_true", help="time forward and backward passes (default: forward only)")
    p.add_argument("--filters", default="none,structural,nn_modules")
    p.add_argument("--calls", type=int, default=200, help="passes per timing")
    p.add_argument("--rounds", type=int, default=3, help="timings of each stance; the fastest counts")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--filter", help=argparse.SUPPRESS)  # one process per filter: guards are set at compile time
    a = p.parse_args()
    if a.filter:
        print("RESULT " + json.dumps(measure(a)), flush=True)
        return
    from train_speed import result_of

    results = []
    for name in a.filters.split(","):
        args = [sys.executable, __file__, "--filter", name, "--calls", str(a.calls), "--rounds", str(a.rounds),
                *(["--device", a.device] if a.device else []), *(["--backward"] if a.backward else [])]
        r = result_of(name, subprocess.run(args, capture_output=True, text=True))
        if r is not None:
            results.append(r)
    print(f"{'filter':11s} {'guards kept':>11s} {'pass ms':>8s} {'unsafe skip':>11s} {'guards ms/call':>14s}")
    for r in results:
        print(f"{r['filter']:11s} {r['kept']:5d}/{r['guards']:<5d} {r['pass_ms']:8.2f} {r['pass_ms_unsafe_skip']:11.2f} {r['guard_ms_per_call']:14.3f}")
    if results:
        print("guards by kind (every guard):", ", ".join(f"{k} {v}" for k, v in list(results[0]["kinds"].items())[:8]))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
