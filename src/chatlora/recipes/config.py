"""`chatlora config presets | keys | show`: look at configs without training."""

from __future__ import annotations

import textwrap

from chatlora.config.load import field_docs, load_config, preset_names, to_dict


def presets() -> None:
    """The shipped presets, one name a line."""
    print("\n".join(preset_names()))


def keys() -> None:
    """Every config key, dotted as overrides spell it, with its default and meaning."""
    for key, default, doc in field_docs():
        print(f"{key} = {default}")
        print(textwrap.fill(doc, 96, initial_indent="    ", subsequent_indent="    "))


def show(config: str, overrides: list[str]) -> None:
    """`config` with `overrides` applied and every default filled in, as YAML."""
    import yaml

    print(yaml.safe_dump(to_dict(load_config(config, overrides)), allow_unicode=True, sort_keys=False), end="")
