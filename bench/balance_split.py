"""How unevenly a step's samples load the GPUs when split by count (accelerate's sharding) and by
tokens (chatlora's split, trainer/balance.py), on real data; CPU only, seconds.

    python bench/balance_split.py --tokenizer ../shared/data/qwen-tokenizer --data ../shared/data/huanhuan.json

The samples are tokenized as `chatlora train qwen1.5-7b-chat-huanhuan` tokenizes them. For each GPU
count N, random steps of --per-gpu x N samples (weak scaling, as bench/scale_speed.py) are split both
ways; printed: the busiest GPU's tokens over the mean GPU's, averaged over the steps. Under DDP the
step waits for the busiest GPU, so if time follows tokens this ratio bounds the efficiency lost to
the split. It says nothing of other per-step costs: only a GPU run measures those.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from train_speed import ROOT, TINY, model_folder  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(ROOT.parent / "shared/data/qwen-tokenizer"))
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/huanhuan.json"))
    p.add_argument("--gpus", default="2,4,8")
    p.add_argument("--per-gpu", type=int, default=128, help="samples per GPU per optimizer step")
    p.add_argument("--steps", type=int, default=2000, help="random steps drawn per GPU count")
    a = p.parse_args()

    from chatlora.config import load_config
    from chatlora.model.tokenized import load_data
    from chatlora.data.groups import split

    with tempfile.TemporaryDirectory() as tmp:
        model = model_folder(Path(a.tokenizer), Path(tmp) / "model", TINY)  # the tokenizer is all that is read
        cfg = load_config("qwen1.5-7b-chat-huanhuan", [f"model.name={model}", f"data.train={a.data}"])
        lengths = [len(ids) for ids in load_data(cfg, lambda _line: None).data.train.dataset["input_ids"]]
    print(f"{len(lengths)} samples: {statistics.mean(lengths):.1f} tokens on average (s.d. {statistics.pstdev(lengths):.1f}, "
          f"{min(lengths)}..{max(lengths)}); {a.per_gpu} samples per GPU per step, {a.steps} random steps")
    heads = ("by count", "by tokens, equal counts", "by tokens, free counts")
    print("busiest GPU's tokens / mean GPU's tokens, split:")
    print(f"{'GPUs':>4}  " + "  ".join(f"{h:>23}" for h in heads))
    rng = random.Random(0)
    for gpus in (int(n) for n in a.gpus.split(",")):
        ratios: list[list[float]] = [[], [], []]
        for _ in range(a.steps):
            step = rng.sample(range(len(lengths)), a.per_gpu * gpus)
            mean = sum(lengths[i] for i in step) / gpus
            by_count = [step[g * a.per_gpu:(g + 1) * a.per_gpu] for g in range(gpus)]
            for r, groups in zip(ratios, (by_count, split(step, lengths, gpus, equal_counts=True), split(step, lengths, gpus))):
                r.append(max(sum(lengths[i] for i in g) for g in groups) / mean)
        print(f"{gpus:>4}  " + "  ".join(f"{statistics.mean(r):>23.4f}" for r in ratios))


if __name__ == "__main__":
    main()
