"""A GGUF base model, unpacked once into folders transformers reads in a second.

transformers reads a GGUF file by parsing its header in Python and de-quantizing every tensor, at every
load: about 35 s for the demo's 135M model on 2 CPU cores (8 s of it the tokenizer), before chat,
eval, merge, serve or export can start. No library keeps the result, so chatlora writes it under
`cache_root()/gguf/`, keyed by the file (its path, size and modification time) and transformers'
version, and later loads read that instead:

- `header/`: the tokenizer and the model config (what the data check, the plan and the generation
  config need; no generation_config.json, so it is derived from the config as for the GGUF itself);
- `<dtype>/`: the config and the de-quantized weights in that dtype, as transformers' GGUF loader
  returned them, so a model loaded from the folder has the same tensors.

Each folder is written beside its place and renamed into it, so a killed process or a second one
converting at the same time never leaves half a folder to be read. Where the cache cannot be written
(a read-only or full disk), the GGUF file is read directly, as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from chatlora.config.load import cache_root
from chatlora.model.source import Source

log = logging.getLogger(__name__)


def _folder(source: Source) -> Path:
    import transformers

    file = (Path(source.path) / source.gguf_file).resolve()
    stat = file.stat()
    key = f"{file}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return cache_root() / "gguf" / f"{file.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _write(place: Path, fill) -> None:
    """Fill a new folder beside `place` and rename it into place; a folder already there is kept."""
    place.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{place.name}-", dir=place.parent))
    try:
        fill(tmp)
        os.rename(tmp, place)
    except OSError:
        if not place.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unpacked(source: Source, name: str, fill) -> Source:
    if not source.gguf_file or source.kind != "gguf":
        return source  # a folder, or a GGUF on the hub (its file is not here until it is downloaded)
    try:
        place = _folder(source) / name
        if not place.is_dir():
            _write(place, fill)
    except OSError as e:
        log.warning("could not keep the unpacked GGUF in the cache (%s); reading the GGUF file itself", e)
        return source
    return Source(str(place), None, "local")


def header(source: Source, trust_remote_code: bool = False) -> Source:
    """The folder holding `source`'s tokenizer and config, or `source` itself when it is no local GGUF."""
    from transformers import AutoConfig, AutoTokenizer

    def fill(tmp: Path) -> None:
        AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs()).save_pretrained(tmp)
        AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.kwargs()).save_pretrained(tmp)

    return _unpacked(source, "header", fill)


def weights(source: Source, dtype, trust_remote_code: bool = False) -> Source:
    """The folder holding `source`'s config and weights in `dtype` (a torch dtype), or `source` itself
    when it is no local GGUF."""
    from transformers import AutoModelForCausalLM

    def fill(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **source.kwargs())
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)  # the tensors are plain now
        model.save_pretrained(tmp)
        (tmp / "generation_config.json").unlink(missing_ok=True)  # load.py derives it from the config

    return _unpacked(source, str(dtype).removeprefix("torch."), fill)
