"""Peak memory and tokenizing speed of streamed training data (data.streaming) against the in-memory path.

    python bench/stream_data.py                      # a 2 GB JSONL (the issue's size): hours on a small CPU
    python bench/stream_data.py --rows general --num-proc 2 --only stream   # the 2 GB streamed: 55 minutes on 2 cores
    python bench/stream_data.py --mb 64              # what 2 CPU cores do in a few minutes
    python bench/stream_data.py --mb 64 --bad-every 10000       # a malformed line every 10,000: the report

Writes a JSONL of `--mb` megabytes of alpaca rows (the tutorial's huanhuan.json rows, numbered so no
two are alike) under --dir, then tokenizes it with the Qwen tokenizer (../shared/data/qwen-tokenizer)
twice, each in a process of its own so that its peak resident memory (ru_maxrss) is its own:

  memory   data/prepare.py: every row read and checked (load_sources), then tokenized (prepare)
  stream   data/stream.py: each row read, checked and tokenized as it comes, written to Arrow on disk

Each prints rows, tokens, seconds, tokens/s and peak RSS; the cache is a fresh folder each time, so
both tokenize. Prints one JSON line per path, then the ratios. With --num-proc N (data.num_proc) the
rows are fitted in N worker processes; the peak RSS printed is then the parent's plus N times the
largest worker's (an upper bound on what they held at once). With --bad-every K a malformed line
replaces every K-th row: the run then ends with chatlora's error report, whose named lines and
count are printed and checked against the lines written.
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


ROWS = {"huanhuan": SHARED / "huanhuan.json", "general": HERE.parent / "src/chatlora/examples/general/train.jsonl"}


def make_jsonl(path: Path, mb: int, bad_every: int = 0, rows_of: str = "huanhuan") -> int:
    """A JSONL file of at least `mb` MB; returns its rows. Made once per size (kept under --dir). Its
    rows are those of ROWS[rows_of] over and over, each numbered so no two are alike."""
    if path.is_file() and path.stat().st_size >= mb * 2**20:
        return sum(1 for _ in path.open("rb"))
    text = ROWS[rows_of].read_text("utf-8")
    base = json.loads(text) if rows_of == "huanhuan" else [json.loads(line) for line in text.splitlines()]
    rows, size = 0, 0
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        while size < mb * 2**20:
            row = base[rows % len(base)]
            if bad_every and (rows + 1) % bad_every == 0:
                line = '{"instruction": "malformed", "output": }'
            elif "messages" in row:
                messages = [dict(m) for m in row["messages"]]
                messages[-2]["content"] += f" ({rows})"
                line = json.dumps({"messages": messages}, ensure_ascii=False)
            else:
                line = json.dumps({"instruction": f"{row['instruction']} ({rows})", "input": row["input"], "output": row["output"]},
                                  ensure_ascii=False)
            f.write(line + "\n")
            size += len(line.encode("utf-8")) + 1
            rows += 1
    tmp.rename(path)
    return rows


def child(mode: str, data: str, num_proc: int) -> dict:
    from transformers import AutoTokenizer

    from chatlora.config.schema import DataConfig
    from chatlora.data.prepare import load_sources, prepare, tokenizer_fingerprint
    from chatlora.data.render import Renderer
    from chatlora.errors import DataError

    tokenizer = AutoTokenizer.from_pretrained(str(SHARED / "qwen-tokenizer"))
    renderer = Renderer(tokenizer, {tokenizer.convert_tokens_to_ids("<|im_end|>")})
    cfg = DataConfig(train=[data], max_length=512, streaming=mode == "stream", num_proc=num_proc)
    start = time.perf_counter()
    try:
        if mode == "stream":
            from chatlora.data.stream import stream_split

            split = stream_split(cfg, renderer, tokenizer_fingerprint(tokenizer, renderer))
        else:
            loaded = load_sources(cfg)
            split = prepare(cfg, tokenizer, renderer, loaded.train, []).train
    except DataError as e:  # --bad-every: the report, as a user sees it
        return {"mode": mode, "num_proc": num_proc, "seconds": round(time.perf_counter() - start, 1),
                "problems": len(e.problems) + e.more, "named": [p.where for p in e.problems], "peak_rss_mib": peak_rss(num_proc)}
    seconds = time.perf_counter() - start
    import pyarrow.compute as pc

    tokens = pc.sum(pc.list_value_length(split.dataset.data.column("input_ids"))).as_py()
    return {"mode": mode, "num_proc": num_proc, "rows": split.rows, "samples": len(split.dataset), "tokens": tokens,
            "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds), "peak_rss_mib": peak_rss(num_proc)}


def peak_rss(num_proc: int) -> int:
    """MiB: this process's peak, plus num_proc times the largest finished worker's when there were any."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if num_proc > 1 else 0
    return round((own + num_proc * workers) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=2048, help="size of the generated JSONL in MB (default 2048: 2 GB)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the JSONL is written (and kept)")
    parser.add_argument("--num-proc", type=int, default=1, help="data.num_proc: worker processes that fit the rows")
    parser.add_argument("--only", choices=("memory", "stream"), help="run one path only")
    parser.add_argument("--rows", choices=sorted(ROWS), default="huanhuan",
                        help="huanhuan: the tutorial's rows (Chinese, alpaca); general: the package's everyday-question "
                        "conversations (English, messages with a system prompt)")
    parser.add_argument("--bad-every", type=int, default=0, help="a malformed line every K rows (a file of its own)")
    parser.add_argument("--child", choices=("memory", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.num_proc)))
        return
    data = Path(args.dir) / "stream_bench_{}mb{}{}.jsonl".format(
        args.mb, f"_bad{args.bad_every}" if args.bad_every else "", "" if args.rows == "huanhuan" else f"_{args.rows}")
    rows = make_jsonl(data, args.mb, args.bad_every, args.rows)
    print(f"data: {data} ({data.stat().st_size / 2**20:.0f} MiB, {rows:,} rows)", flush=True)
    results = {}
    for mode in (args.only,) if args.only else ("memory", "stream"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "CHATLORA_CACHE": cache, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--data", str(data), "--num-proc", str(args.num_proc)], env=env,
                                 capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps(results[mode]), flush=True)
    if args.bad_every:
        written = [f"line {i}" for i in range(args.bad_every, rows + 1, args.bad_every)]
        for mode, got in results.items():
            print(f"{mode}: {got['problems']} problems reported, {len(written)} malformed lines written; "
                  f"the named ones are the first written: {got['named'] == written[:len(got['named'])]}")
        return
    if len(results) < 2:
        return
    memory, stream = results["memory"], results["stream"]
    print(f"stream / memory: tokens/s {stream['tokens_per_s'] / memory['tokens_per_s']:.2f}, "
          f"peak RSS {stream['peak_rss_mib'] / memory['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
