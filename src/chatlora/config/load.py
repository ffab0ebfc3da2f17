"""Config files, presets and `key=value` overrides → a checked `Config`.

Unknown keys are errors that name the nearest valid key, because a misspelt option that is silently
ignored (`lerning_rate=1e-3`) costs a whole training run.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import os
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from chatlora.config.schema import Config
from chatlora.errors import ConfigError

PRESET_PACKAGE = "chatlora.config.presets"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads `2e-4` as a string and `no` as False; YAML 1.2, and every user, read
    them as a number and a string (`training.eval_strategy=no` must reach TrainingArguments as "no")."""


# Booleans as YAML 1.2 has them: true and false only, not yes/no/on/off.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def preset_names() -> list[str]:
    """Names of the presets shipped in the package."""
    files = resources.files(PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def read_config_file(name_or_path: str) -> tuple[dict[str, Any], str]:
    """The raw mapping of a preset name or YAML path, and the run's default name.

    Raises ConfigError for a missing file, bad YAML or a top level that is not a mapping.
    """
    path = Path(name_or_path)
    if name_or_path in preset_names():
        text = resources.files(PRESET_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text("utf-8")
        source, default_name = f"preset {name_or_path}", name_or_path
    elif path.is_file():
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); save the config as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read: {e.strerror or e}") from None
        source, default_name = str(path), path.stem
    else:
        near = difflib.get_close_matches(name_or_path, preset_names(), n=1)
        hint = f" Did you mean the preset {near[0]!r}?" if near else ""
        raise ConfigError(
            f"{name_or_path!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file.{hint}"
        )
    try:
        raw = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model:, data:, ...)")
    raw.setdefault("name", default_name)
    return raw, source


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted `section.key=value` pairs; values are parsed as YAML (`1e-4`, `true`, `[q_proj,v_proj]`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. training.learning_rate=1e-4)")
        try:
            value = load_yaml(text) if text else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(name_or_path: str = "demo", overrides: list[str] | None = None) -> Config:
    """Load a preset or YAML file, apply overrides, check every key and value.

    Raises ConfigError naming the bad key (and the nearest valid one) or value.
    """
    raw, _ = read_config_file(name_or_path)
    raw = apply_overrides(raw, list(overrides or []))
    return build(Config, raw, "")


def training_argument_names() -> list[str]:
    return list(training_argument_kinds())


# The value types the config checks in `training:` (TrainingArguments checks the rest itself).
_PLAIN = {int: "int", float: "float", bool: "bool"}


def training_argument_kinds() -> dict[str, str]:
    """Every TrainingArguments field a config may set, with its plain value type: `int`, `float` or
    `bool` (`int?` where null is allowed too), or `` for anything else.

    Importing TrainingArguments takes seconds (it imports torch and accelerate), so the table is
    cached per transformers version: a misspelt key, a wrong value or a bad data row is then
    reported at once, before anything heavy loads.
    """
    from importlib.metadata import version

    cache = cache_root() / f"training_arguments-{version('transformers')}.json"
    try:
        return json.loads(cache.read_text("utf-8"))
    except (OSError, ValueError):
        pass
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    kinds = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.init:
            hint = hints[f.name]
            options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
            plain = _PLAIN.get(options[0], "") if len(options) == 1 else ""
            kinds[f.name] = plain + ("?" if plain and options != [hint] else "")
    try:  # a cache that cannot be written costs only the import next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(kinds), "utf-8")
        os.replace(tmp, cache)
    except OSError:
        pass
    return kinds


def _check_training(training: dict[str, Any]) -> None:
    """Unknown keys and values of the wrong plain type under `training:`, named before anything loads."""
    kinds = training_argument_kinds()
    for key, value in training.items():
        key = str(key)
        if key not in kinds:
            raise _unknown(key, list(kinds), "training.")
        if key == "output_dir":
            raise ConfigError("training.output_dir is set by chatlora; use output_dir= (the run folder)")
        kind = kinds[key]
        if not kind or (value is None and kind.endswith("?")):
            continue
        if key == "gradient_checkpointing" and value == "auto":
            continue  # the memory plan decides it before TrainingArguments sees it (plan/entry.py)
        hint = {"int": int, "float": float, "bool": bool}[kind.rstrip("?")]
        _check(hint, value, f"training.{key}")  # raises ConfigError naming the key, the value and the type


def cache_root() -> Path:
    """chatlora's cache folder: `$CHATLORA_CACHE`, or ~/.cache/chatlora."""
    return Path(os.environ.get("CHATLORA_CACHE") or Path.home() / ".cache" / "chatlora")


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{where}{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{where}{key}'{hint}")


def build(cls: type, raw: Any, where: str) -> Any:
    """Turn a mapping into dataclass `cls`, recursing into nested dataclasses and checking types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise _unknown(str(key), names, where)
        kwargs[key] = _check(hints[key], value, f"{where}{key}")
    if cls is Config and "training" in kwargs:
        _check_training(kwargs["training"])
    return cls(**kwargs)


def _check(hint: Any, value: Any, where: str) -> Any:
    """Check `value` against a type hint of the schema; returns the value (ints accepted as floats)."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value if value is not None else {}, where + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if type(value) in options:  # an exact match first: "all-linear" stays a str, not ["all-linear"]
            return value
        shapes = [o for o in options if dataclasses.is_dataclass(o)]
        if isinstance(value, dict) and shapes:  # a mapping for a section: its own errors name the bad key
            return build(shapes[0], value, where + ".")
        for option in options:
            try:
                return _check(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(hint)}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [_check(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return value
        if value is None:
            return {}
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint in (str, bool):
        if isinstance(value, hint):
            return value
    elif hint is Any:
        return value
    raise ConfigError(f"{where}: {value!r} is not a valid {_type_name(hint)}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (what the run folder's config.yaml holds)."""
    return dataclasses.asdict(cfg)


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) of every field, read from the schema's attribute docstrings."""
    source = inspect.getsource(cls)
    tree = ast.parse(source)
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_docs(hints[f.name], f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f"{prefix}{f.name}", repr(default), docs.get(f.name, "")))
        # A list whose items may be sections (data.train's source mappings): their keys as `key[].field`.
        items = typing.get_args(hints[f.name])[:1] if typing.get_origin(hints[f.name]) is list else ()
        for shape in (o for item in items for o in typing.get_args(item) if dataclasses.is_dataclass(o)):
            rows += [row for row in field_docs(shape, f"{prefix}{f.name}[].")]
    return rows
