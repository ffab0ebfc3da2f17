"""Load what a run folder describes: the base model, its adapter, and the tokenizer used in training.

Every command after `train` (chat, eval, merge, serve, web) starts here, from the run path alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from chatlora.config.schema import Config
from chatlora.data.render import Renderer
from chatlora.errors import ChatloraError
from chatlora.model.load import load_generation_config, load_model, stop_ids
from chatlora.model.source import resolve
from chatlora.run import RunDir


@dataclass
class Loaded:
    model: object
    """The base model with the adapter(s) attached (a peft model), or the bare base model."""
    tokenizer: object
    renderer: Renderer
    config: Config
    run: RunDir | None
    adapters: list[str]
    """Adapter names loaded into the peft model (the first is active)."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_run(path: str | Path, device: str | None = None, with_adapter: bool = True, extra_runs: list[str | Path] = ()) -> Loaded:
    """Load a run's base model (and adapter), ready for generation in eval mode.

    `extra_runs` are further run folders trained on the same base model: their adapters are added to
    the same peft model under their folder names. Raises ChatloraError for a path that is not a run
    folder, a run with no adapter yet, or extra runs on another base model.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    run = RunDir.open(path)
    cfg = run.load_config()
    if with_adapter and not (run.adapter / "adapter_model.safetensors").is_file():
        raise ChatloraError(f"{run.path} has no trained adapter yet (adapter/adapter_model.safetensors); did training finish?")
    source = resolve(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    generation_config = load_generation_config(source, cfg.model, tokenizer)
    model = load_model(source, cfg.model, tokenizer, generation_config, device or default_device())
    names: list[str] = []
    if with_adapter:
        name = run.path.name
        model = PeftModel.from_pretrained(model, run.adapter, adapter_name=name)
        names.append(name)
        for extra in extra_runs:
            other = RunDir.open(extra)
            if other.load_config().model != cfg.model:
                raise ChatloraError(f"{other.path} was trained on another base model than {run.path}; serve them separately")
            model.load_adapter(other.adapter, adapter_name=other.path.name)
            names.append(other.path.name)
        model.set_adapter(names[0])
    model.eval()
    renderer = Renderer(tokenizer, set(stop_ids(model.generation_config)), cfg.data.train_on)
    return Loaded(model, tokenizer, renderer, cfg, run, names)
