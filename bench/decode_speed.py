"""Batch-1 decode speed: the tutorial's inference path against merged eager `generate` and chatlora's
fast path, same model, same prompt, same run; greedy, a fixed number of new tokens.

    python bench/decode_speed.py --tokenizer .carry/qwen-tokenizer --out $OUT/decode_speed.json   # GPU, 7B
    python bench/decode_speed.py --tiny --tokenizer ../shared/data/qwen-tokenizer --tokens 32 --out /tmp/d.json

Variants (in this order, on one model):
  tutorial  the base model wrapped by PeftModel with an unmerged LoRA (r 8, all 7 projections, random
            non-zero B), `generate` — what the tutorial's inference script does
  eager     the same adapter merged (`merge_and_unload`), plain `generate`
  graphs    chatlora's fast path: static KV cache, decode steps replayed from CUDA graphs
  compile   the same with torch.compile's kernels (compiling counted in warmup_s, not in decode_tok_s)
  static    the static cache without graphs (the only fast variant a CPU runs)
  auto      what `chatlora chat` does with no --decode flag (compile on CUDA, eager on a CPU)

The model is the Qwen1.5-7B architecture with random bf16 weights (no model hub is reachable; speed
equals the real model's), or with --tiny a 2-layer one in float32 on the CPU as a smoke check. Every
variant's tokens are compared with `eager`'s: with random weights in bf16 two logits can tie exactly,
after which greedy paths may part; the first differing position is recorded, not hidden.

decode_tok_s = new tokens / seconds of the whole reply (its prefill included: a short prompt).
bandwidth_limit_tok_s = the card's memory bandwidth / bytes of weights read per token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from architectures import QWEN15_7B, QWEN2_TINY  # noqa: E402

# Memory bandwidth in bytes/s by card name (datasheet figures).
BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.04e12}
PROMPT = [{"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"},
          {"role": "user", "content": "你是谁？给我讲讲你在宫里的一天。"}]


def card() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    bandwidth = next((bw for key, bw in BANDWIDTH.items() if key in name), None)
    if bandwidth is None and "H100" in name:
        bandwidth = BANDWIDTH["H100 SXM"]
    return name, bandwidth


def build(args):
    """(base model, tokenizer, prompt ids) with random weights; the base model is left untouched."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    shape = dict(QWEN2_TINY if args.tiny else QWEN15_7B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    config = Qwen2Config(**shape, eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id)
    dtype = getattr(torch, args.dtype) if args.dtype else torch.float32 if args.device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id)
    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    return model, tokenizer, list(prompt)


def config_layers(args) -> int:
    return args.layers or (QWEN2_TINY if args.tiny else QWEN15_7B)["num_hidden_layers"]


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: a trained adapter's is not
            torch.nn.init.normal_(p, std=0.01)
    return peft_model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_generate(model, prompt: list[int], tokens: int, device: str) -> tuple[list[int], float]:
    ids = torch.tensor([prompt], device=device)
    sync()
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, temperature=None, top_p=None, top_k=None)
    sync()
    return out[0, len(prompt):].tolist(), time.perf_counter() - started


def timed_decoder(decoder, prompt: list[int], tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens as chat generates them (one host sync per token, to stream it), the seconds of the
    reply and of its first token."""
    sync()
    started = time.perf_counter()
    decoder.reset()
    logits = decoder.add(prompt)
    out = [int(logits.argmax())]
    first = time.perf_counter() - started
    while len(out) < tokens:
        out.append(int(decoder.step(out[-1:])[0].argmax()))
    sync()
    return out, time.perf_counter() - started, first


def profile(decoder, prompt: list[int], steps: int = 64) -> dict:
    """Where a decode step's time goes: the recorded graphs replayed back to back (GPU time, no host
    sync between tokens), and the kernels of the same step run eagerly (no graph), largest first."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    decoder.reset()
    token = int(decoder.add(prompt).argmax())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        decoder.step([token])
    end.record()
    sync()
    graph_ms = start.elapsed_time(end) / steps
    mode, decoder.mode = decoder.mode, "static"  # the same step without its graph: kernels one by one
    try:
        decoder.step([token])
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                decoder.step([token])
            sync()
    finally:
        decoder.mode = mode
        decoder.reset()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events) / 4
    kernels = sum(e.count for e in events) / 4
    print(f"profile: graph replay {graph_ms:.2f} ms/step on the GPU; eager step: {kernels:.0f} kernels, "
          f"{total_us / 1000:.2f} ms of kernel time", flush=True)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15), flush=True)
    return {"graph_replay_ms": round(graph_ms, 3), "eager_step_kernels": int(kernels),
            "eager_step_kernel_ms": round(total_us / 1000, 3)}


def divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="folder of the Qwen1.5 tokenizer")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model on the CPU: a smoke check of the script")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's; --tiny --layers 32 "
                   "gives the 7B's depth at the tiny width: dynamo's trace, the cost of a compiled start, grows with depth)")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    p.add_argument("--tokens", type=int, default=256, help="new tokens per reply (default 256)")
    p.add_argument("--variants", default=None, help="comma-separated (default: tutorial,eager,graphs,compile on CUDA; "
                                                     "tutorial,eager,static on CPU)")
    p.add_argument("--dtype", default=None, help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU); "
                   "float32 on the GPU checks that the fast paths equal eager token for token, where bf16's "
                   "rounding lets near-tied logits of a random-weight model part them")
    p.add_argument("--columns", type=int, default=4096, help="static cache length, as chat uses (default 4096)")
    p.add_argument("--ttft-tokens", type=int, default=200, help="prompt length for the time-to-first-token figure")
    p.add_argument("--profile", action="store_true", help="also time the graphs' GPU work per step (no host sync "
                   "per token) and list the kernels of one un-graphed step (CUDA): where a token's time goes")
    p.add_argument("--out", required=True, help="JSON file to write (a list of records)")
    args = p.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    variants = (args.variants or ("tutorial,eager,graphs,compile" if cuda else "tutorial,eager,static")).split(",")

    from chatlora.generate.decode import StaticDecoder, fast_decoder

    gpu, bandwidth = card()
    model, tokenizer, prompt = build(args)
    tutorial = with_lora(model)
    weight_bytes = None
    records, reference = [], None
    common = {"gpu": gpu, "batch": 1, "new_tokens": args.tokens, "prompt_tokens": len(prompt),
              "model": f"qwen2-tiny, {config_layers(args)} layers" if args.tiny else f"qwen1.5-7b-architecture (random {args.dtype or 'bfloat16'})",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__}

    def record(variant: str, tokens: list[int], seconds: float, **extra) -> None:
        rate = len(tokens) / seconds
        rec = {"variant": variant, **common, "decode_tok_s": round(rate, 2), "seconds": round(seconds, 3), **extra}
        if reference is not None:
            at = divergence(tokens, reference)
            rec.update(equal_to_eager=at is None, first_divergence=at)
        if bandwidth and weight_bytes:
            rec["bandwidth_limit_tok_s"] = round(bandwidth / weight_bytes, 1)
            rec["share_of_limit"] = round(rate * weight_bytes / bandwidth, 3)
        records.append(rec)
        print(json.dumps(rec, ensure_ascii=False), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")

    if "tutorial" in variants:
        timed_generate(tutorial, prompt, 4, args.device)  # warm-up: cuBLAS handles, allocator
        tokens, seconds = timed_generate(tutorial, prompt, args.tokens, args.device)
        record("tutorial", tokens, seconds, what="PeftModel (unmerged LoRA r8, 7 projections) + generate")
        tutorial_tokens = tokens
    merged = tutorial.merge_and_unload().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    common["weight_gb"] = round(weight_bytes / 1e9, 2)
    timed_generate(merged, prompt, 4, args.device)
    reference, seconds = timed_generate(merged, prompt, args.tokens, args.device)
    if "eager" in variants:
        record("eager", reference, seconds, what="merged adapter + generate (eager, growing cache)")
    if "tutorial" in variants:  # the unmerged adapter rounds differently from the merged weights in bf16
        records[0].update(equal_to_eager=divergence(tutorial_tokens, reference) is None,
                          first_divergence=divergence(tutorial_tokens, reference))
    for mode in (v for v in variants if v in ("auto", "graphs", "compile", "static")):
        started = time.perf_counter()
        try:
            decoder = fast_decoder(merged, mode, slots=1, columns=args.columns, echo=print)
            if decoder is None:
                raise RuntimeError("fast_decoder refused (see the line above)")
            warmup = time.perf_counter() - started
            tokens, seconds, _ = timed_decoder(decoder, prompt, args.tokens)
            long_prompt = (prompt * (args.ttft_tokens // len(prompt) + 1))[: args.ttft_tokens]
            timed_decoder(decoder, long_prompt, 2)
            _, _, ttft = timed_decoder(decoder, long_prompt, 2)
        except Exception as e:  # record the failure and go on with the other variants
            records.append({"variant": mode, **common, "error": f"{e.__class__.__name__}: {e}"})
            print(f"{mode}: FAILED {e.__class__.__name__}: {e}", flush=True)
            Path(args.out).write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
            continue
        extra = profile(decoder, prompt) if args.profile and cuda and mode != "static" else {}
        record(mode, tokens, seconds, warmup_s=round(warmup, 1), columns=decoder.columns,
               ttft_s=round(ttft, 4), ttft_prompt_tokens=len(long_prompt),
               what=f"chatlora fast path: static cache, {mode}", **extra)
        del decoder
        if cuda:
            torch.cuda.empty_cache()
    assert StaticDecoder  # the class the fast variants run
    print(f"\nwrote {args.out}")
    print("| variant | tok/s | x tutorial | share of bandwidth limit | equal to eager (first divergence) |")
    print("| --- | ---: | ---: | ---: | --- |")
    base = next((r["decode_tok_s"] for r in records if r["variant"] == "tutorial" and "decode_tok_s" in r), None)
    for r in records:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error'][:80]} | | | |")
            continue
        ratio = f"{r['decode_tok_s'] / base:.1f}" if base else "–"
        share = f"{r['share_of_limit']:.0%}" if "share_of_limit" in r else "–"
        eq = "–" if "equal_to_eager" not in r else ("yes" if r["equal_to_eager"] else f"no ({r['first_divergence']})")
        print(f"| {r['variant']} | {r['decode_tok_s']:.1f} | {ratio} | {share} | {eq} |")


if __name__ == "__main__":
    main()
