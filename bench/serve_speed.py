"""Aggregate generation speed of `chatlora serve` at 1, 8 and 32 concurrent streamed requests, against
sequential `model.generate` (chatlora.model.generate.generate_replies, one prompt at a time).

Every request asks for exactly --tokens new tokens (greedy, `ignore_eos`), so all rows do the same
work; the baseline forces the same length with `min_new_tokens`. The server runs in a child process
(as `chatlora serve` does) with a rank-16 LoRA adapter on every linear layer; this process is the
client, using the official openai package. The adapter's weights are random: speed does not depend
on what it learned. Prints a markdown table for docs/benchmarks.md.

    python bench/serve_speed.py                                  # CPU: SmolLM2-135M-Instruct (embedded GGUF)
    python bench/serve_speed.py --run runs/demo-...              # a real run folder instead
    python bench/serve_speed.py --arch qwen1.5-7b --device cuda  # GPU: random-init Qwen1.5-7B architecture, bf16
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time

PROMPTS = [
    "Why do we see lightning before we hear thunder?", "Give me three tips for keeping basil alive.",
    "What is the capital of Australia, and why not Sydney?", "Explain a hash map to a ten-year-old.",
    "Write a two-line poem about the sea.", "How do I boil an egg so the yolk stays soft?",
    "What does a compiler do?", "Name a good first book about astronomy.",
]

# Qwen1.5-7B-Chat's architecture (its config.json), built with random weights: no download needed.
QWEN15_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
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
    from chatlora.serve.engine import Engine

    options = dict(max_tokens=max(args.tokens, 1024), max_batch=args.max_batch)
    if args.run:
        return Engine.from_runs([args.run], args.device, **options)
    if args.arch == "qwen1.5-7b":
        from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        config = Qwen2Config(**QWEN15_7B, eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = Qwen2ForCausalLM(config).to(torch.bfloat16)
        model.generation_config = GenerationConfig(eos_token_id=im_end, pad_token_id=tokenizer.pad_token_id)
        base_name = "qwen1.5-7b-random"
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
    return Engine(model, renderer, ["default"], base_name, **options)


def baseline(engine, args) -> tuple[float, int, float]:
    """Sequential generate_replies (transformers' generate), one prompt at a time: (seconds, tokens, tok/s)."""
    from chatlora.model.generate import generate_replies

    prompts = [conversation(i) for i in range(args.sequential)]
    # Warm-up at full length: on CPU the first pass over each new sequence length is several times slower.
    generate_replies(engine.model, engine.renderer, prompts[:1], max_new_tokens=args.tokens, batch_size=1,
                     min_new_tokens=args.tokens)
    started = time.perf_counter()
    replies = generate_replies(engine.model, engine.renderer, prompts, max_new_tokens=args.tokens, batch_size=1,
                               min_new_tokens=args.tokens)
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
    pipe.send(("baseline", result[0], str(engine.device), engine.names[0], torch.get_num_threads()))
    sock = server.bind("127.0.0.1", 0)
    server.run(create_app(engine), sock, lambda url: pipe.send(("url", url)))


async def load(url: str, model: str, concurrency: int, requests: int, tokens: int) -> dict:
    """`requests` streamed requests, at most `concurrency` at a time; aggregate tokens/s and latencies."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> tuple[int, float, float]:
        async with gate:
            started = time.perf_counter()
            first, count = None, 0
            stream = await client.chat.completions.create(
                model=model, messages=conversation(i), max_tokens=tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - started
                if chunk.usage:
                    count = chunk.usage.completion_tokens
            return count, first or 0.0, time.perf_counter() - started

    await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm-up: the same shapes once, untimed
    started = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(requests)))
    seconds = time.perf_counter() - started
    await client.close()
    total = sum(r[0] for r in results)
    assert total == requests * tokens, f"expected {requests * tokens} tokens, got {total}"
    return {"seconds": seconds, "tokens": total, "tok_s": total / seconds,
            "ttft": statistics.median(r[1] for r in results), "latency": statistics.median(r[2] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["smollm2-135m", "qwen1.5-7b"], default="smollm2-135m")
    p.add_argument("--run", help="a run folder to serve instead of a base model with a random adapter")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="SmolLM2's dtype (the 7B architecture is always bfloat16)")
    p.add_argument("--tokenizer", default=QWEN_TOKENIZER, help="Qwen tokenizer folder for --arch qwen1.5-7b")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--sequential", type=int, default=4, help="requests at concurrency 1 and in the generate baseline")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads in the server (0: torch's default)")
    args = p.parse_args()

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=server_child, args=(args, child), daemon=True)
    proc.start()
    try:
        _, (b_seconds, b_tokens, b_rate), device, model, threads = parent.recv()
        _, url = parent.recv()
        rows = [("sequential `generate` (batch 1)", 1, b_tokens, b_seconds, b_rate, None, None)]
        for c in map(int, args.concurrency.split(",")):
            r = asyncio.run(load(url, model, c, args.sequential if c == 1 else c, args.tokens))
            rows.append((f"`chatlora serve`, {c} concurrent", c, r["tokens"], r["seconds"], r["tok_s"], r["ttft"], r["latency"]))
    finally:
        proc.terminate()
        proc.join(30)
    what = args.run or args.arch
    print(f"\n{what} + LoRA r=16 on {device} ({threads} torch threads), {args.tokens} new tokens per request, "
          f"greedy; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print("\n| what | concurrent | tokens | seconds | tokens/s | median first token (s) | median request (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, c, tokens, seconds, rate, ttft, latency in rows:
        extra = f"{ttft:.2f} | {latency:.2f}" if ttft is not None else "– | –"
        print(f"| {name} | {c} | {tokens} | {seconds:.2f} | {rate:.1f} | {extra} |")


if __name__ == "__main__":
    main()
