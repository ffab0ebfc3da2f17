"""Peak memory and tokenizing speed of streamed training data (data.streaming) against the in-memory path.

    python bench/stream_data.py                      # a 2 GB JSONL (the issue's size): hours on a small CPU
    python bench/stream_data.py --mb 64              # what 2 CPU cores do in a few minutes

Writes a JSONL of `--mb` megabytes of alpaca rows (the tutorial's huanhuan.json rows, numbered so no
two are alike) under --dir, then tokenizes it with the Qwen tokenizer (../shared/data/qwen-tokenizer)
twice, each in a process of its own so that its peak resident memory (ru_maxrss) is its own:

  memory   data/prepare.py: every row read and checked (load_sources), then tokenized (prepare)
  stream   data/stream.py: each row read, checked and tokenized as it comes, written to Arrow on disk

Each prints rows, tokens, seconds, tokens/s and peak RSS; the cache is a fresh folder each time, so
both tokenize. Prints one JSON line per path, then the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("CHATLORA_SHARED_DATA", HERE.parents[1] / "shared" / "data"))


def make_jsonl(path: Path, mb: int) -> int:
    """A JSONL file of at least `mb` MB; returns its rows. Made once per size (kept under --dir)."""
    if path.is_file() and path.stat().st_size >= mb * 2**20:
        return sum(1 for _ in path.open("rb"))
    base = json.loads((SHARED / "huanhuan.json").read_text("utf-8"))
    rows, size = 0, 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        while size < mb * 2**20:
            row = base[rows % len(base)]
            line = json.dumps({"instruction": f"{row['instruction']} ({rows})", "input": row["input"], "output": row["output"]},
                              ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            rows += 1
    tmp.rename(path)
    return rows


def child(mode: str, data: str) -> dict:
    from transformers import AutoTokenizer

    from chatlora.config.schema import DataConfig
    from chatlora.data.prepare import load_sources, prepare, tokenizer_fingerprint
    from chatlora.data.render import Renderer

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "qwen-tokenizer"))
    renderer = Renderer(tokenizer, {tokenizer.convert_tokens_to_ids("<|im_end|>")})
    cfg = DataConfig(train=[data], max_length=512, streaming=mode == "stream")
    start = time.perf_counter()
    if mode == "stream":
        from chatlora.data.stream import stream_split

        split = stream_split(cfg, renderer, tokenizer_fingerprint(tokenizer, renderer))
    else:
        loaded = load_sources(cfg)
        split = prepare(cfg, tokenizer, renderer, loaded.train, []).train
    seconds = time.perf_counter() - start
    import pyarrow.compute as pc

    tokens = pc.sum(pc.list_value_length(split.dataset.data.column("input_ids"))).as_py()
    return {"mode": mode, "rows": split.rows, "samples": len(split.dataset), "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=2048, help="size of the generated JSONL in MB (default 2048: 2 GB)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the JSONL is written (and kept)")
    parser.add_argument("--child", choices=("memory", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data)))
        return
    data = Path(args.dir) / f"stream_bench_{args.mb}mb.jsonl"
    rows = make_jsonl(data, args.mb)
    print(f"data: {data} ({data.stat().st_size / 2**20:.0f} MiB, {rows:,} rows)", flush=True)
    results = {}
    for mode in ("memory", "stream"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "CHATLORA_CACHE": cache, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data)], env=env,
                                 capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(results[mode]), flush=True)
    memory, stream = results["memory"], results["stream"]
    print(f"stream / memory: tokens/s {stream['tokens_per_s'] / memory['tokens_per_s']:.2f}, "
          f"peak RSS {stream['peak_rss_mib'] / memory['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
