"""A/B of two versions of chatlora on the two GPUs of one host, at the same time: this tree on GPU 0,
another tree on GPU 1, each pinned to its own half of the host's cores (a CPU-bound step would
otherwise take time from the other), then the same two swapped, so that neither GPU's or core set's
speed decides the result.

    git archive 4d379cc src bench | (mkdir -p /tmp/before && tar -x -C /tmp/before)   # where git is
    python bench/ab.py --before /tmp/before --variants seed-compile-layers,throughput-compile-layers \
        --steps 40 --warmup 15 --out bench/results/ab-h200-$(date +%F).json

Each side runs bench/train_speed.py of its own tree with the same arguments (--tokenizer, --data,
--steps, --warmup, --extra); --tiny checks the script on a CPU (no GPUs: the sides run one after the
other), each with empty compile caches. The table gives s/step and the wall time of the whole
variant (compiling included) for each variant and each run, and the ratios before / after.

--bench decode runs bench/decode_speed.py of each tree instead (batch-1 greedy decode, --tokens new
tokens; --variants from its list, e.g. graphs,static) and compares decode tokens/s:

    python bench/ab.py --bench decode --before /tmp/before --variants graphs --tokens 256
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def side(tree: Path, gpu: int | None, cores: str | None, a, out: Path) -> subprocess.Popen:
    if a.bench == "decode":
        cmd = [sys.executable, str(tree / "bench" / "decode_speed.py"), "--tokenizer", a.tokenizer,
               "--variants", a.variants, "--tokens", str(a.tokens), "--out", str(out), *(["--tiny"] if a.tiny else [])]
    else:
        cmd = [sys.executable, str(tree / "bench" / "train_speed.py"), "--tokenizer", a.tokenizer, "--data", a.data,
               "--variants", a.variants, "--steps", str(a.steps), "--warmup", str(a.warmup), "--out", str(out),
               *(["--tiny"] if a.tiny else []), *(["--extra", *a.extra] if a.extra else [])]
    if cores:
        cmd = ["taskset", "-c", cores, *cmd]
    # An empty compile cache for each side and run: a cache warmed by the other side or the first run
    # would make compiling look free (train_wall_s compares the compile times too).
    cache = out.with_suffix(".inductor")
    # The tree's src first; what PYTHONPATH held already (wheels unpacked on a GPU machine) after it.
    path = os.pathsep.join(filter(None, [str(tree / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "TRITON_CACHE_DIR": str(cache / "triton")}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return subprocess.Popen(cmd, env=env, stdout=open(out.with_suffix(".log"), "w"), stderr=subprocess.STDOUT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="the other tree (holding src/ and bench/), e.g. from git archive")
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/qwen-tokenizer"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/huanhuan.json"))
    p.add_argument("--bench", choices=("train", "decode"), default="train",
                   help="train: bench/train_speed.py's s/step; decode: bench/decode_speed.py's tokens/s")
    p.add_argument("--variants", default=None, help="default: seed-compile-layers (train), graphs (decode)")
    p.add_argument("--tokens", type=int, default=256, help="decode: new tokens per reply")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--extra", nargs="*", default=[])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", help="JSON file: every run's results, labelled")
    a = p.parse_args()
    a.variants = a.variants or ("graphs" if a.bench == "decode" else "seed-compile-layers")
    import torch

    trees = {"before": Path(a.before).resolve(), "after": ROOT}
    two = torch.cuda.device_count() >= 2
    half = (os.cpu_count() or 2) // 2
    cores = [f"0-{half - 1}", f"{half}-{2 * half - 1}"] if two else [None, None]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run, order in enumerate((("after", "before"), ("before", "after"))):  # GPU 0 first, then swapped
            procs = []
            for gpu, name in enumerate(order):
                out = Path(tmp) / f"{run}-{name}.json"
                proc = side(trees[name], gpu if two else None, cores[gpu], a, out)
                if not two:
                    proc.wait()
                procs.append((name, gpu, out, proc))
            for name, gpu, out, proc in procs:
                proc.wait()
                if proc.returncode or not out.exists():
                    print(f"run {run + 1}, {name} on GPU {gpu}: failed\n" + out.with_suffix(".log").read_text()[-3000:])
                    continue
                for r in json.loads(out.read_text()):
                    results.append({**r, "side": name, "run": run + 1, "gpu_index": gpu})
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
    if a.bench == "decode":
        print(f"{'variant':32s} {'run':>3s} {'tok/s before':>12s} {'after':>8s} {'after/before':>12s}")
        for variant in a.variants.split(","):
            for run in (1, 2):
                got = {r["side"]: r for r in results if r["variant"] == variant and r["run"] == run and "decode_tok_s" in r}
                if len(got) == 2:
                    b, f = got["before"]["decode_tok_s"], got["after"]["decode_tok_s"]
                    print(f"{variant:32s} {run:3d} {b:12.1f} {f:8.1f} {f / b:11.3f}x")
        return
    print(f"{'variant':32s} {'run':>3s} {'s/step before':>13s} {'after':>7s} {'ratio':>6s} {'wall s before':>13s} {'after':>7s} {'ratio':>6s}")
    for variant in a.variants.split(","):
        for run in (1, 2):
            got = {r["side"]: r for r in results if r["variant"] == variant and r["run"] == run}
            if len(got) == 2:
                b, f = got["before"], got["after"]
                print(f"{variant:32s} {run:3d} {b['s_per_step']:13.3f} {f['s_per_step']:7.3f} {b['s_per_step'] / f['s_per_step']:5.2f}x"
                      f" {b['train_wall_s']:13.1f} {f['train_wall_s']:7.1f} {b['train_wall_s'] / f['train_wall_s']:5.2f}x")


if __name__ == "__main__":
    main()
