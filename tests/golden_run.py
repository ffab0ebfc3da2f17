"""The golden run's settings, shared by the test and by scripts/regen_golden.py."""


def golden_overrides() -> list[str]:
    return ["training.max_steps=5", "training.seed=1234", "training.per_device_train_batch_size=3",
            "training.gradient_accumulation_steps=2", "lora.dropout=0.1"]
