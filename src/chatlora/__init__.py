"""chatlora: turn an open chat model into your own assistant with LoRA."""

__version__ = "0.1.0"
