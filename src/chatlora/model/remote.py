"""Models whose architecture transformers does not include: their config.json names a model type
that transformers does not know, and (InternLM2, say) an `auto_map` of Python files shipped with the
model that define it. transformers runs those files only with trust_remote_code; without it, or
without the files, its own errors name a tokenizer backend or a hub page. Found here, from
config.json alone, before anything loads."""

from __future__ import annotations

import json
from pathlib import Path


def _code_files(auto_map: dict) -> list[str]:
    """The .py files an auto_map names ("modeling_internlm2.InternLM2ForCausalLM", or a list of such)."""
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    # A reference may name another repo ("org/repo--module.Class"): its file is the part after "--".
    return sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})


def remote_code_problem(folder: Path, trust_remote_code: bool) -> str | None:
    """Why the model in `folder` cannot load as configured, when its architecture is not one
    transformers includes (None: it is one, or there is no config.json to tell)."""
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return None  # no or unreadable config.json: loading says so
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or model_type in CONFIG_MAPPING:
        return None
    auto_map = config.get("auto_map")
    arch = f"{(config.get('architectures') or [model_type])[0]} (model_type {model_type!r})"
    if not isinstance(auto_map, dict) or not auto_map:
        return (f"{folder}/config.json: {arch} is not an architecture transformers {__version__} includes, and the "
                "folder ships no code for it (no auto_map); a newer transformers may know it (pip install -U transformers)")
    files = _code_files(auto_map)
    if not trust_remote_code:
        return (f"{folder}: {arch} is not an architecture transformers includes; it is defined by code shipped with "
                f"the model ({', '.join(files)}), which chatlora runs only with model.trust_remote_code=true. Set it if "
                "you trust that code, or use a version of the model converted to an architecture transformers includes")
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        return (f"{folder}: {arch} is defined by code shipped with the model, but {', '.join(missing)} (named by "
                f"auto_map in config.json) {'is' if len(missing) == 1 else 'are'} not in the folder; copy the model's "
                ".py files into it")
    return None
