"""Load what a run folder describes: the base model, its adapter, and the tokenizer used in training.

Every command after `train` (chat, eval, merge, serve, web) starts here, from the run path alone.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from chatlora.config.schema import Config, ModelConfig
from chatlora.data.render import Renderer
from chatlora.errors import ChatloraError, ModelError
from chatlora.model.load import (add_stop_tokens, fix_pad_token, load_generation_config, load_model, load_tokenizer,
                                 stop_ids, unreadable)
from chatlora.model.source import resolve
from chatlora.run import RunDir


@dataclass
class Loaded:
    model: object
    """The base model with the adapter(s) attached (a peft model), or the bare base model."""
    tokenizer: object
    renderer: Renderer
    config: Config | None
    """The run's config; None for an adapter folder that is not inside a run folder."""
    run: RunDir | None
    adapters: list[str]
    """Adapter names loaded into the peft model (the first is active)."""
    decoder: object | None = None
    """The fast decode path over `model` (a chatlora.generate.decode.StaticDecoder), when one was made."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the run was trained with (None: the chat template's default)."""
        return self.config.data.system_prompt if self.config else None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_run(path: str | Path, device: str | None = None, with_adapter: bool = True, extra_runs: list[str | Path] = (),
             base: str | None = None) -> Loaded:
    """Load a run's base model (and adapter), ready for generation in eval mode.

    `extra_runs` are further run folders trained on the same base model: their adapters are added to
    the same peft model under their folder names. `base` loads the base model from another place
    than the run's config says (a local copy of a hub model, say). Raises ChatloraError for a path
    that is not a run folder, a run with no adapter yet, or extra runs on another base model; a
    ConfigError or ModelError naming a missing or damaged file of the run (config, tokenizer, adapter)
    or an adapter that does not fit the base model.
    """
    run = RunDir.open(path)
    cfg = run.load_config()
    if base:
        cfg.model = dataclasses.replace(cfg.model, name=base, source="auto", gguf_file=None)
    runs = [run]
    if with_adapter:  # every adapter checked before the base model loads: a damaged one fails in seconds
        runs += [RunDir.open(extra) for extra in extra_runs]
        for other in runs:
            if other is not run and other.load_config().model != cfg.model:
                raise ChatloraError(f"{other.path} was trained on another base model than {run.path}; serve them separately")
            if not (other.adapter / "adapter_model.safetensors").is_file():
                raise ChatloraError(f"{other.path} has no trained adapter yet (adapter/adapter_model.safetensors); "
                                    "did training finish?")
            check_adapter(other.adapter)
    source = resolve(cfg.model)
    tokenizer = _run_tokenizer(run)
    generation_config = load_generation_config(source, cfg.model, tokenizer)
    model = load_model(source, cfg.model, tokenizer, generation_config, device or default_device())
    names: list[str] = []
    if with_adapter:
        for other in runs:
            model = _attach(model, other.adapter, other.path.name, cfg.model.name)
            names.append(other.path.name)
        model.set_adapter(names[0])
    model.eval()
    renderer = Renderer(tokenizer, set(stop_ids(model.generation_config)), cfg.data.train_on, cfg.data.reasoning)
    return Loaded(model, tokenizer, renderer, cfg, run, names)


def load_adapter_dir(path: str | Path, base: str | None = None, device: str | None = None) -> Loaded:
    """Load a peft adapter folder that is not a chatlora run: its base model is `base`, or the one its
    adapter_config.json names; its tokenizer the folder's own when it has one, else the base model's.

    Raises ChatloraError when no base model is known, ModelError when it cannot be loaded, or when
    an adapter file is missing or damaged, or does not fit it.
    """
    folder = Path(path).resolve()  # "." still has a folder name (the adapter is named after it)
    adapter_config = check_adapter(folder)
    name = base or adapter_config.get("base_model_name_or_path")
    if not name:
        raise ChatloraError(f"{folder}/adapter_config.json names no base model; give it with --model")
    model_cfg = ModelConfig(name=name)
    try:
        source = resolve(model_cfg)
        if (folder / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            tokenizer = load_tokenizer(source, model_cfg)
        generation_config = load_generation_config(source, model_cfg, tokenizer)
    except ModelError as e:
        if base:
            raise
        raise ModelError(f"{e}\n(the base model named in {folder}/adapter_config.json; give the right one with --model)") from None
    renderer = Renderer(tokenizer, set(stop_ids(generation_config)))
    end_of_turn = renderer.end_of_turn()
    if end_of_turn is not None and end_of_turn not in stop_ids(generation_config):
        # A base model whose generation config misses the template's end-of-turn token would talk on
        # past the reply; chatlora's own runs check this before training.
        add_stop_tokens(generation_config, tokenizer, [tokenizer.convert_ids_to_tokens(end_of_turn)])
    fix_pad_token(tokenizer, end_of_turn)
    model = load_model(source, model_cfg, tokenizer, generation_config, device or default_device())
    model = _attach(model, folder, folder.name, name)
    model.eval()
    renderer = Renderer(tokenizer, set(stop_ids(model.generation_config)))
    return Loaded(model, tokenizer, renderer, None, None, [folder.name])


def check_file(path: Path, what: str, fix: str) -> None:
    """Raise ModelError when `path` is missing or cannot be read (cut short, emptied, overwritten),
    naming it: `what` says what it is ("the adapter file"), `fix` what to do."""
    if not path.is_file():
        raise ModelError(f"{what} {path} is missing; {fix}")
    why = unreadable(path)
    if why:
        raise ModelError(f"{what} {path} is damaged ({why}); {fix}")


def _adapter_fix(folder: Path) -> str:
    """What to do about a missing or damaged file of the adapter folder `folder`."""
    run = RunDir(folder.parent)
    if not run.config.is_file():
        return "save or download the adapter again"
    last = run.latest_checkpoint()
    return f"retrain, or use the adapter of the run's last checkpoint (give {last} as RUN)" if last else "retrain"


def check_adapter(folder: Path) -> dict:
    """The adapter's adapter_config.json, once it and the adapter's weights are known to be readable.
    Raises ModelError naming the missing or damaged file (peft's own errors name neither)."""
    fix = _adapter_fix(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file() and (folder / "adapter_model.bin").is_file():
        weights = folder / "adapter_model.bin"  # peft's older format
    check_file(folder / "adapter_config.json", "the adapter config", fix)
    check_file(weights, "the adapter file", fix)
    return json.loads((folder / "adapter_config.json").read_text("utf-8"))


def _attach(model, folder: Path, name: str, base: str):
    """`model` with the adapter in `folder` loaded as `name`: a peft model of the base model, or the
    peft model `model` with one adapter more. Raises ModelError for an adapter that does not fit."""
    from peft import PeftModel

    try:
        if isinstance(model, PeftModel):
            model.load_adapter(folder, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, folder, adapter_name=name)
    except (RuntimeError, ValueError) as e:
        # torch's load_state_dict lists every mismatched tensor; the first says enough. Other
        # RuntimeErrors (out of memory, say) are not the adapter's.
        lines = str(e).splitlines()
        why = next((line.strip() for line in lines if "size mismatch" in line), None)
        if why is None and isinstance(e, ValueError):
            why = lines[0] if lines else e.__class__.__name__  # peft: target modules not in the model, a bad config
        if why is None:
            raise
        raise ModelError(f"the adapter in {folder} does not fit the base model {base} ({why.rstrip('.')}): it was "
                         "trained on another base model, or its adapter_config.json does not match its weights; give "
                         "the base model it was trained on with --model") from None


def _run_tokenizer(run: RunDir):
    """The tokenizer the run was trained with (its tokenizer/ folder); ModelError when missing or damaged."""
    from transformers import AutoTokenizer

    last = run.latest_checkpoint()
    # Every checkpoint holds a copy of the tokenizer (Trainer saves it there).
    fix = (f"copy the tokenizer files of its checkpoint {last} (tokenizer*.json, chat_template.jinja) into {run.tokenizer}, "
           "or retrain" if last else "retrain")
    if not run.tokenizer.is_dir():
        raise ModelError(f"{run.path} has no tokenizer/ folder (the tokenizer the run was trained with); {fix}")
    for file in sorted(run.tokenizer.glob("*.json")):
        check_file(file, "the tokenizer file", fix)
    try:
        return AutoTokenizer.from_pretrained(run.tokenizer)
    except Exception as e:  # the tokenizers library raises bare Exceptions (and KeyErrors) for a file it cannot parse
        why = f"{e.__class__.__name__}: {str(e).splitlines()[0]}" if str(e) else e.__class__.__name__
        raise ModelError(f"the run's tokenizer in {run.tokenizer} cannot be loaded ({why}); {fix}") from None


def load_target(path: str | Path, base: str | None = None, device: str | None = None) -> Loaded:
    """What every command after train takes: a run folder, the adapter/ folder inside one, or any
    peft adapter folder (with `base` or the base model its adapter_config.json names).

    Raises ChatloraError for a path that is none of these.
    """
    folder = Path(path).resolve()
    if (folder / "config.yaml").is_file():
        return load_run(folder, device, base=base)
    if (folder / "adapter_config.json").is_file():
        if (folder.parent / "config.yaml").is_file():
            return load_run(folder.parent, device, base=base)
        return load_adapter_dir(folder, base, device)
    if not folder.exists():
        raise ChatloraError(f"{folder}: no such run folder")
    raise ChatloraError(f"{folder} is neither a chatlora run folder (config.yaml) nor a peft adapter folder (adapter_config.json)")
