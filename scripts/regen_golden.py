"""Regenerate tests/golden/tiny_losses.json: the tiny model's losses for the golden run's settings.

    python scripts/regen_golden.py

Run it only after a deliberate change to the loss, the data pipeline or the defaults, and say why in
the commit: the golden test exists to catch the changes nobody meant to make.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import save_tiny_model, tiny_config  # noqa: E402  (the test's own tiny model)
from golden_run import golden_overrides  # noqa: E402


def main() -> None:
    from chatlora.recipes.train import train
    from chatlora.trainer.plot import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["CHATLORA_CACHE"] = str(tmp / "cache")
        model = save_tiny_model(tmp / "model")
        run = train(tiny_config(model, tmp, *golden_overrides()), echo=lambda _line: None)
        losses = [row["loss"] for row in read_metrics(run.metrics) if "loss" in row]
    out = ROOT / "tests" / "golden" / "tiny_losses.json"
    out.write_text(json.dumps({"settings": golden_overrides(), "losses": losses}, indent=2) + "\n")
    print(f"wrote {out}: {losses}")


if __name__ == "__main__":
    main()
