"""`chatlora plan`: predicted peak GPU memory and tokens/s of a config, before anything is loaded.

Read top to bottom: the data's sample lengths (tokenized as training would, cached; on a problem,
samples of max_length are assumed) → the plan, printed (plan/entry.py: plan_for, which reads the
model's architecture from its config.json, no weights, and the GPU, detected or named).
"""

from __future__ import annotations

from collections.abc import Callable

from chatlora.config.schema import Config
from chatlora.errors import ChatloraError, ModelError
from chatlora.model.source import resolve
from chatlora.model.tokenized import check_data
from chatlora.plan.entry import plan_for, samples_of, worst_case
from chatlora.plan.plan import Plan


def plan(cfg: Config, echo: Callable[[str], None] = print) -> Plan | None:
    """`chatlora plan`: read the data (quietly; on a problem, assume max_length samples), then print the plan."""
    try:
        checked = check_data(cfg, echo=lambda _line: None)
        samples, source = samples_of(checked.data), checked.source
    except ModelError:
        raise
    except ChatloraError as e:
        echo(f"note: the data could not be read ({' '.join(str(e).split())[:300]}); planning for samples of max_length tokens")
        samples, source = worst_case(cfg), resolve(cfg.model)
    return plan_for(cfg, source, samples, echo)[1]
