"""`chatlora data check`: the pre-flight alone. Reads and checks the data, renders it with the model's
tokenizer and template, shows what will be trained, and fails on what would ruin a run. No weights
are loaded. `train` runs the same steps first (model/tokenized.py: check_data).
"""

from __future__ import annotations

from collections.abc import Callable

from chatlora.config.schema import Config
from chatlora.model.tokenized import check_data


def data_check(cfg: Config, samples: int = 3, echo: Callable[[str], None] = print) -> None:
    """Print the pre-flight report of `cfg`'s data with `samples` rendered samples.

    Raises DataError (bad rows), ModelError (tokenizer not found) or PreflightError (the rendered
    data would train the model wrongly).
    """
    check_data(cfg, echo, samples=samples)
