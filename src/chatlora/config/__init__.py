"""Typed config, presets and overrides."""

from chatlora.config.load import load_config, preset_names, to_dict
from chatlora.config.schema import Config, DataConfig, LoraSettings, ModelConfig, ReportConfig

__all__ = ["Config", "DataConfig", "LoraSettings", "ModelConfig", "ReportConfig", "load_config", "preset_names", "to_dict"]
