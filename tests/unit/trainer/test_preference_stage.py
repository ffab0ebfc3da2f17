"""`stage: dpo` end to end in-process on the tiny model: an SFT run, then preference training from its
adapter (the frozen copy as the reference), with rewards in metrics.jsonl and the held-out preference
accuracy at each evaluation; the saved adapter holds the trained adapter only."""

from __future__ import annotations

import json

from conftest import FIXTURES, quiet_train, tiny_config


def test_dpo_from_an_sft_run(tiny_run, tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, "stage=dpo", f"model.adapter={tiny_run}", "data.validation=0.25",
                      "training.max_steps=4", "training.eval_strategy=steps", "training.eval_steps=2",
                      data=str(FIXTURES / "pairs.jsonl"))
    run = quiet_train(cfg)
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_rewards/accuracies" in r]
    assert len(train) == 4 and all(k in train[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"))
    # The first step compares the adapter with its own frozen copy: every reward is 0 and the loss log 2.
    assert abs(train[0]["loss"] - 0.6931) < 1e-3 and train[0]["rewards/chosen"] == 0
    assert train[-1]["rewards/margins"] > 0
    assert len(evals) >= 3  # before training, at steps 2 and 4, after
    # The evaluation after training sees the model of step 4, against the same reference (the frozen
    # SFT adapter, not the base model: the saved adapter must not take the reference with it).
    last_step, after = [r for r in rows if "eval_loss" in r][-2:]
    assert last_step["step"] == after["step"] == 4
    assert abs(last_step["eval_loss"] - after["eval_loss"]) < 1e-5, (last_step, after)
    saved = json.loads((run.adapter / "adapter_config.json").read_text())
    assert not (run.adapter / "ref").exists() and saved["r"] == 4
    # The same commands afterwards: eval's held-out prompts (the pairs' prompts, answered by the
    # chosen reply) and the run loaded as chat and eval load it.
    from chatlora.data.pipeline import held_out
    from chatlora.model.from_run import load_run

    prompts, name = held_out(run.path, None)
    assert name == "validation" and prompts and prompts[0].messages[-1]["role"] == "assistant"
    loaded = load_run(run.path)
    assert len(loaded.adapters) == 1 and loaded.config.stage == "dpo"


def test_preference_settings_are_checked(tiny_model_dir, tmp_path):
    import pytest

    from chatlora.errors import ConfigError

    with pytest.raises(ConfigError, match="preference.loss: 'dpo' is not one of sigmoid, ipo, orpo, simpo, kto"):
        tiny_config(tiny_model_dir, tmp_path, "stage=dpo", "preference.loss=dpo")
    with pytest.raises(ConfigError, match="preference.beta: 0(.0)? must be a positive number"):
        tiny_config(tiny_model_dir, tmp_path, "stage=dpo", "preference.beta=0")
    cfg = tiny_config(tiny_model_dir, tmp_path, "stage=dpo", "data.batch_tokens=64", data=str(FIXTURES / "pairs.jsonl"))
    with pytest.raises(ConfigError, match="stage: dpo trains on one process"):
        quiet_train(cfg)
    assert not (tmp_path / "run").exists()


def test_kto_from_an_sft_run_and_orpo_from_a_new_adapter(tiny_run, tiny_model_dir, tmp_path):
    for name, overrides, data in (("kto", [f"model.adapter={tiny_run}"], "kto.jsonl"), ("orpo", [], "pairs.jsonl")):
        cfg = tiny_config(tiny_model_dir, tmp_path / name, "stage=dpo", f"preference.loss={name}", "training.max_steps=2",
                          *overrides, data=str(FIXTURES / data))
        rows = [json.loads(line) for line in quiet_train(cfg).metrics.read_text().splitlines()]
        train = [r for r in rows if "loss" in r]
        assert len(train) == 2 and all(r["loss"] == r["loss"] for r in train), name  # finite, logged
        assert "rewards/chosen" in train[0] and "rewards/rejected" in train[0], name
        if name == "kto":
            assert "kl" in train[0]


def test_a_shared_prompt_trains_as_the_prompt_twice(tiny_run, tiny_model_dir, tmp_path):
    """preference.share_prompt through `chatlora train`: the same logged losses and rewards, step by
    step, and a clear refusal where it cannot apply (kto's single replies)."""
    import pytest

    from chatlora.errors import ConfigError

    from chatlora.recipes.train import train

    runs, lines = [], []
    for share in ("false", "true"):
        cfg = tiny_config(tiny_model_dir, tmp_path / share, "stage=dpo", f"model.adapter={tiny_run}", "training.max_steps=3",
                          f"preference.share_prompt={share}", data=str(FIXTURES / "pairs.jsonl"))
        rows = [json.loads(line) for line in train(cfg, echo=lines.append).metrics.read_text().splitlines()]
        runs.append([v for r in rows if "loss" in r for v in (r["loss"], r["rewards/margins"])])
    assert len(runs[0]) == 6 and runs[1] == pytest.approx(runs[0], rel=1e-4, abs=1e-6)
    assert sum("each pair's prompt once (mask)" in line for line in lines) == 1, [x for x in lines if x.startswith("batches")]
    with pytest.raises(ConfigError, match="share_prompt is for pairs"):
        tiny_config(tiny_model_dir, tmp_path / "kto", "stage=dpo", "preference.loss=kto", "preference.share_prompt=true")
