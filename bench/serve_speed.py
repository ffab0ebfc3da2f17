"""Aggregate generation speed of `chatlora serve` at 1, 8 and 32 concurrent streamed requests, against
sequential `model.generate` (chatlora.generate.replies.generate_replies, one prompt at a time).

Every request asks for exactly --tokens new tokens (greedy, `ignore_eos`), so all rows do the same
work; the baseline forces the same length with `min_new_tokens`. The server runs in a child process
(as `chatlora serve` does) with a rank-16 LoRA adapter on every linear layer; this process is the
client, using the official openai package. The adapter's weights are random: speed does not depend
on what it learned. Prints a markdown table for docs/benchmarks.md.

    python bench/serve_speed.py                                  # CPU: SmolLM2-135M-Instruct (embedded GGUF)
    python bench/serve_speed.py --run runs/demo-...              # a real run folder instead
    python bench/serve_speed.py --arch qwen1.5-7b --device cuda  # GPU: random-init Qwen1.5-7B architecture, bf16

--decode picks the engine's decode path (graphs on CUDA by default: continuous batching over a
static cache); --check-equal also sends every request of the largest level alone and compares the
replies; --ttft-tokens N times the first token of an N-token prompt; --json writes the records
(`variant`, `gpu`, `batch`, `decode_tok_s`, ...) for bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time
from pathlib import Path

from architectures import QWEN15_7B, QWEN2_TINY

PROMPTS = [
    "Why do we see lightning before we hear thunder?", "Give me three tips for keeping basil alive.",
    "What is the capital of Australia, and why not Sydney?", "Explain a hash map to a ten-year-old.",
    "Write a two-line poem about the sea.", "How do I boil an egg so the yolk stays soft?",
    "What does a compiler do?", "Name a good first book about astronomy.",
]

QWEN_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "qwen-tokenizer")


def conversation(i: int) -> list[dict]:
    return [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (question {i})"}]


def build_engine(args):
    """The Engine the server runs: a run folder's, or a base model with a random rank-16 adapter."""
    import torch

    from chatlora.config.schema import LoraSettings, ModelConfig
    from chatlora.data.render import Renderer
    from chatlora.model.load import fix_pad_token, load_generation_config, load_model, load_tokenizer, stop_ids
    from chatlora.model.lora import add_lora
    from chatlora.model.source import resolve
    from chatlora.generate.engine import Engine

    from chatlora.generate.decode import fast_decoder

    options = dict(max_tokens=max(args.tokens, 1024), max_batch=args.max_batch)
    if args.run:
        return Engine.from_runs([args.run], args.device, args.decode, args.max_context, print, **options)
    if args.arch in ("qwen1.5-7b", "qwen2-tiny"):
        from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        shape = QWEN15_7B if args.arch == "qwen1.5-7b" else QWEN2_TINY
        config = Qwen2Config(**shape, eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        with torch.device(args.device):
            default = torch.float32 if args.device == "cpu" else torch.bfloat16
            model = Qwen2ForCausalLM(config).to(default if args.dtype == "auto" else getattr(torch, args.dtype))
        model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id)
        base_name = f"{args.arch}-random"
    else:
        cfg = ModelConfig(name="smollm2-135m-instruct", dtype=args.dtype)
        source = resolve(cfg)
        tokenizer = load_tokenizer(source, cfg)
        generation = load_generation_config(source, cfg, tokenizer)
        renderer = Renderer(tokenizer, set(stop_ids(generation)))
        fix_pad_token(tokenizer, renderer.end_of_turn())
        model = load_model(source, cfg, tokenizer, generation, args.device)
        base_name = cfg.name
    model = add_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; a real adapter's B is not
            torch.nn.init.normal_(p, std=0.01)
    model.eval()
    renderer = Renderer(tokenizer, set(stop_ids(model.generation_config)))
    decoder = fast_decoder(model, args.decode, slots=args.max_batch, columns=args.max_context, echo=print, warm=False)
    started = time.perf_counter()
    engine = Engine(model, renderer, ["default"], base_name, decoder=decoder, **options)
    print(f"engine ready in {time.perf_counter() - started:.1f} s (graphs recorded for every served name)", flush=True)
    return engine


def baseline(engine, args) -> tuple[float, int, float]:
    """Sequential generate_replies (transformers' generate), one prompt at a time: (seconds, tokens, tok/s)."""
    from chatlora.generate.replies import generate_replies
    from chatlora.generate.sampling import Sampling

    prompts = [conversation(i) for i in range(args.baseline_requests)]
    # Warm-up at full length on CPU, where the first pass over each new sequence length is several times slower.
    warm = args.tokens if args.device == "cpu" else 8
    generate_replies(engine.model, engine.renderer, prompts[:1], Sampling(max_new_tokens=warm, min_new_tokens=warm), batch_size=1)
    started = time.perf_counter()
    replies = generate_replies(engine.model, engine.renderer, prompts,
                               Sampling(max_new_tokens=args.tokens, min_new_tokens=args.tokens), batch_size=1)
    seconds = time.perf_counter() - started
    tokens = sum(r.tokens for r in replies)
    return seconds, tokens, tokens / seconds


def server_child(args, pipe) -> None:
    """Build the engine, time the generate baseline, then serve on a free loopback port."""
    import torch

    from chatlora.serve import server
    from chatlora.serve.app import create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args)
    # The baseline runs in a worker thread like the engine's: on a busy CPU, torch ops from Python's
    # main thread were measured 2.5x slower than the same ops from another thread (OpenMP teams).
    result: list = []
    worker = threading.Thread(target=lambda: result.append(baseline(engine, args)))
    worker.start()
    worker.join()
    mode = "eager" if engine.decoder is None else engine.decoder.mode
    gpu = torch.cuda.get_device_name() if engine.device.type == "cuda" else "cpu"
    ttft_prompt = long_prompt(lambda m: len(engine.prompt(m)), args.ttft_tokens) if args.ttft_tokens else None
    pipe.send(("baseline", result[0], str(engine.device), engine.names[0], torch.get_num_threads(), mode, gpu, ttft_prompt,
               len(engine.prompt(ttft_prompt)) if ttft_prompt else 0))
    sock = server.bind("127.0.0.1", 0)
    server.run(create_app(engine), sock, lambda url: pipe.send(("url", url)))


async def load(url: str, model: str, concurrency: int, requests: int, tokens: int, first: int = 0,
               messages=conversation, warm: bool = True) -> dict:
    """`requests` streamed requests, at most `concurrency` at a time; aggregate tokens/s and latencies."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[int, float, float, str]:
        async with gate:
            started = time.perf_counter()
            first, count, text = None, 0, []
            stream = await client.chat.completions.create(
                model=model, messages=messages(i), max_tokens=tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first if first is not None else time.perf_counter() - started
                    text.append(chunk.choices[0].delta.content)
                if chunk.usage:
                    count = chunk.usage.completion_tokens
            return count, first or 0.0, time.perf_counter() - started, "".join(text)

    if warm:  # warm-up: the same shapes once, untimed
        await asyncio.gather(*(one(first + i) for i in range(concurrency)))
    started = time.perf_counter()
    results = await asyncio.gather(*(one(first + i) for i in range(requests)))
    seconds = time.perf_counter() - started
    await client.close()
    total = sum(r[0] for r in results)
    assert total == requests * tokens, f"expected {requests * tokens} tokens, got {total}"
    return {"seconds": seconds, "tokens": total, "tok_s": total / seconds, "texts": [r[3] for r in results],
            "ttft": statistics.median(r[1] for r in results), "latency": statistics.median(r[2] for r in results)}


def compare(together: list[str], alone: list[str]) -> dict:
    """How many concurrent replies equal their reply alone, and where the first differing ones part (in characters)."""
    parts = [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
             for x, y in zip(together, alone) if x != y]
    return {"equal_replies": len(together) - len(parts), "replies": len(together), "first_divergence_chars": sorted(parts)[:8]}


def long_prompt(tokenizer_len, n: int):
    """A one-message conversation whose rendered prompt has about n tokens."""
    words = " ".join(f"{PROMPTS[i % len(PROMPTS)]}" for i in range(n))
    lo, hi = 1, len(words)
    while lo < hi:  # the longest prefix of `words` that renders to at most n tokens
        mid = (lo + hi + 1) // 2
        if tokenizer_len([{"role": "user", "content": words[:mid]}]) <= n:
            lo = mid
        else:
            hi = mid - 1
    return [{"role": "user", "content": words[:lo]}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["smollm2-135m", "qwen1.5-7b", "qwen2-tiny"], default="smollm2-135m",
                   help="qwen2-tiny: 2 layers of the Qwen architecture, a CPU smoke check of this script")
    p.add_argument("--run", help="a run folder to serve instead of a base model with a random adapter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="the weights' dtype (auto: SmolLM2's own; for the Qwen "
                   "architectures bfloat16 on CUDA, float32 on CPU). float32 on a GPU checks --check-equal where "
                   "bf16 rounding, which differs between batch sizes, parts near-tied logits of random weights")
    p.add_argument("--tokenizer", default=QWEN_TOKENIZER, help="Qwen tokenizer folder for --arch qwen1.5-7b")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--sequential", type=int, default=4, help="requests at concurrency 1 and in the generate baseline")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the server (0: torch's default)")
    p.add_argument("--decode", default="auto", help="the engine's decode mode (chatlora.model.decode_modes.MODES; default auto)")
    p.add_argument("--max-context", type=int, default=2048, help="static cache tokens per request (default 2048)")
    p.add_argument("--baseline-requests", type=int, default=None, help="prompts in the generate baseline (default --sequential)")
    p.add_argument("--check-equal", action="store_true", help="send each request of the largest level alone too and compare")
    p.add_argument("--ttft-tokens", type=int, default=0, help="time the first token of a prompt of this many tokens (0: off)")
    p.add_argument("--json", help="write the records here as JSON")
    args = p.parse_args()
    args.baseline_requests = args.baseline_requests or args.sequential

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=server_child, args=(args, child), daemon=True)
    proc.start()
    def receive():
        while not parent.poll(1):
            if not proc.is_alive():
                raise SystemExit("the server process died (its traceback is above)")
        return parent.recv()

    try:
        _, (b_seconds, b_tokens, b_rate), device, model, threads, mode, gpu, ttft_prompt, ttft_len = receive()
        _, url = receive()
        rows = [("sequential `generate` (batch 1)", 1, b_tokens, b_seconds, b_rate, None, None)]
        common = {"gpu": gpu, "decode": mode, "new_tokens": args.tokens, "model": args.run or args.arch,
                  "date": time.strftime("%Y-%m-%d")}
        records = [{"variant": "generate-sequential", "batch": 1, "decode_tok_s": round(b_rate, 2), **common}]
        levels = list(map(int, args.concurrency.split(",")))
        last = None
        for c in levels:
            r = last = asyncio.run(load(url, model, c, args.sequential if c == 1 else c, args.tokens))
            rows.append((f"`chatlora serve`, {c} concurrent", c, r["tokens"], r["seconds"], r["tok_s"], r["ttft"], r["latency"]))
            records.append({"variant": f"serve-{mode}", "batch": c, "decode_tok_s": round(r["tok_s"], 2),
                            "median_ttft_s": round(r["ttft"], 4), "median_request_s": round(r["latency"], 3), **common})
        if args.check_equal and last is not None:
            top = levels[-1]
            alone = asyncio.run(load(url, model, 1, top, args.tokens, warm=False))
            records[-1].update(compare(last["texts"], alone["texts"]))
            print(f"{top} concurrent vs alone: {records[-1]['equal_replies']}/{top} replies equal", flush=True)
        if ttft_prompt:
            r = asyncio.run(load(url, model, 1, 3, 1, messages=lambda i: ttft_prompt))
            records.append({"variant": f"serve-{mode}-ttft", "batch": 1, "prompt_tokens": ttft_len,
                            "median_ttft_s": round(r["ttft"], 4), **common})
            print(f"time to first token, {ttft_len}-token prompt: {r['ttft'] * 1000:.0f} ms (median of 3)", flush=True)
        one = next((r for r in records if r["batch"] == 1 and r["variant"].startswith("serve")), None)
        if one:
            for r in records:
                if r["variant"].startswith("serve") and "decode_tok_s" in r:
                    r["x_batch1"] = round(r["decode_tok_s"] / one["decode_tok_s"], 2)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    finally:
        proc.terminate()
        proc.join(30)
    what = args.run or args.arch
    print(f"\n{what} + LoRA r=16 on {device} ({threads} torch threads, decode {mode}), {args.tokens} new tokens per request, "
          f"greedy; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("\n| what | concurrent | tokens | seconds | tokens/s | median first token (s) | median request (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, c, tokens, seconds, rate, ttft, latency in rows:
        extra = f"{ttft:.2f} | {latency:.2f}" if ttft is not None else "– | –"
        print(f"| {name} | {c} | {tokens} | {seconds:.2f} | {rate:.1f} | {extra} |")


if __name__ == "__main__":
    main()
