"""Evaluation during training on the tiny model: replies on held-out prompts every N steps, the eval
loss every N steps, the best checkpoint kept, TensorBoard, and settings that cannot work."""

from __future__ import annotations

import pytest
import torch

from chatlora.errors import ConfigError
from chatlora.trainer.plot import read_metrics
from conftest import tiny_config


def train(cfg, lines=None):
    from chatlora.recipes.train import train as run_train

    return run_train(cfg, echo=(lines.append if lines is not None else lambda _line: None))


def test_replies_on_held_out_prompts_every_n_steps(tiny_model_dir, tmp_path, capsys):
    lines: list[str] = []
    run = train(tiny_config(tiny_model_dir, tmp_path, "data.validation=0.3", "training.max_steps=4",
                            "eval.steps=2", "eval.prompts=2", "eval.max_new_tokens=6"), lines)
    rows = [r for r in read_metrics(run.metrics) if "generations" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        gens = row["generations"]
        assert len(gens) == 2 and all(set(g) == {"prompt", "reply", "stopped", "tokens"} for g in gens)
        assert row["gen_stop_rate"] == sum(g["stopped"] for g in gens) / 2
        assert row["gen_mean_tokens"] == sum(g["tokens"] for g in gens) / 2
        assert 0 <= row["gen_repetition"] <= 1 and 0 <= row["gen_rouge_l"] <= 1
    printed = capsys.readouterr().out  # during training, lines go through the progress bar's writer
    assert "step 2/4  held-out replies: stop rate 0% (0/2), mean length 6.0 tokens" in printed
    assert "!!! WARNING: stop rate 0%: none of the 2 held-out replies ended on <|im_end|> within 6 tokens." in printed


def test_replies_follow_the_eval_loss_by_default(tiny_model_dir, tmp_path):
    lines: list[str] = []
    run = train(tiny_config(tiny_model_dir, tmp_path, "data.validation=0.3", "training.max_steps=4",
                            "training.eval_strategy=steps", "training.eval_steps=2", "eval.max_new_tokens=4"), lines)
    before = "\n".join(lines[: next(i for i, line in enumerate(lines) if line.startswith("held-out loss:"))])
    # Before training it is the base model: a note, not the alarm.
    assert "before training  held-out replies: stop rate 0% (0/3)" in before
    assert "(the base model: no reply ended on <|im_end|> within 4 tokens)" in before and "WARNING" not in before
    metrics = read_metrics(run.metrics)
    # Before training, at steps 2 and 4 (the evaluation after training has the same weights as step 4).
    assert [r["step"] for r in metrics if "eval_loss" in r] == [0, 2, 4, 4]
    assert [r["step"] for r in metrics if "generations" in r] == [0, 2, 4]
    assert len(next(r for r in metrics if "generations" in r)["generations"]) == 3  # eval.prompts=4, 3 held-out rows


def test_the_stop_rate_is_counted_from_real_stops(tiny_model_dir, tmp_path):
    """Every byte a stop token: each reply ends on its first token, so the stop rate is 100%."""
    from transformers import AutoTokenizer

    cfg = tiny_config(tiny_model_dir, tmp_path, "data.validation=0.3", "training.max_steps=2", "eval.steps=2",
                      "eval.max_new_tokens=50")

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg.model.stop_tokens = [t for t in tok.get_vocab() if len(t) == 1] + ["<|endoftext|>", "<|im_start|>"]
    run = train(cfg)
    (row,) = [r for r in read_metrics(run.metrics) if "generations" in r]
    assert row["gen_stop_rate"] == 1.0 and row["gen_mean_tokens"] == 0.0


def test_best_checkpoint_is_kept_as_the_adapter(tiny_model_dir, tmp_path):
    """greater_is_better=true keeps the *worst* held-out loss (step 2's), so the run's adapter must be
    that checkpoint's, not the last step's: the mechanism, shown where it makes a difference."""
    from safetensors.torch import load_file

    lines: list[str] = []
    run = train(tiny_config(tiny_model_dir, tmp_path, "data.validation=0.3", "training.max_steps=6",
                            "training.eval_strategy=steps", "training.eval_steps=2", "training.load_best_model_at_end=true",
                            "training.greater_is_better=true", "eval.steps=0"), lines)
    checkpoints = sorted(p.name for p in run.checkpoints.iterdir())
    assert checkpoints == ["checkpoint-2"], "save_strategy=best and save_total_limit=1 keep the best only"
    best = load_file(run.checkpoints / "checkpoint-2" / "adapter_model.safetensors")
    kept = load_file(run.adapter / "adapter_model.safetensors")
    assert kept.keys() == best.keys()
    for key in kept:
        torch.testing.assert_close(kept[key], best[key])
    evals = [r["eval_loss"] for r in read_metrics(run.metrics) if "eval_loss" in r]
    assert evals[-1] == pytest.approx(evals[1]), "the final held-out loss is the best checkpoint's"
    assert any(line.startswith("best checkpoint: ") and "checkpoint-2" in line for line in lines)


def test_best_checkpoint_by_lowest_loss(tiny_model_dir, tmp_path):
    run = train(tiny_config(tiny_model_dir, tmp_path, "data.validation=0.3", "training.max_steps=4",
                            "training.eval_strategy=steps", "training.eval_steps=2", "training.load_best_model_at_end=true",
                            "eval.steps=0"))
    evals = {r["step"]: r["eval_loss"] for r in read_metrics(run.metrics) if "eval_loss" in r and r["step"] > 0}
    best = min(evals, key=evals.get)
    assert [p.name for p in run.checkpoints.iterdir()] == [f"checkpoint-{best}"]


def test_tensorboard_logs_in_the_run_folder(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_config(tiny_model_dir, tmp_path, "data.validation=0.3", "training.max_steps=2",
                            "training.report_to=tensorboard", "training.eval_strategy=steps", "training.eval_steps=2",
                            "eval.max_new_tokens=4"))
    events = EventAccumulator(str(run.path / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "eval/loss", "train/gen_stop_rate"} <= set(tags)
    assert not (run.checkpoints / "runs").exists()


@pytest.mark.parametrize("overrides, message", [
    (["training.eval_strategy=steps"], "training.eval_strategy=steps needs held-out data: set data.validation"),
    (["data.validation=0.3", "training.load_best_model_at_end=true"],
     "training.load_best_model_at_end needs the held-out loss during training: set training.eval_strategy=steps"),
    (["data.validation=0.3", "training.eval_strategy=steps", "training.load_best_model_at_end=true",
      "training.metric_for_best_model=accuracy"], "training.metric_for_best_model: 'accuracy' is not computed"),
    (["eval.steps=5"], "eval.steps needs held-out prompts"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens: 0 must be at least 1"),
])
def test_settings_that_cannot_work_are_refused_before_training(tiny_model_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as e:
        train(tiny_config(tiny_model_dir, tmp_path, *overrides))
    assert message in str(e.value)
    assert not (tmp_path / "run").exists()


def test_cli_refuses_them_with_exit_2(tiny_model_dir, tmp_path, capsys):
    from chatlora.cli import main

    assert main(["config", "show", "demo", "training.load_best_model_at_end=true", "training.eval_strategy=no"]) == 2
    assert "training.load_best_model_at_end needs the held-out loss" in capsys.readouterr().err


def test_no_is_a_string_as_in_yaml_1_2():
    """`eval_strategy=no` must reach TrainingArguments as "no", not YAML 1.1's False."""
    from chatlora.config.load import load_config

    cfg = load_config("demo", ["training.eval_strategy=no", "training.save_strategy=no", "training.bf16=false"])
    assert cfg.training["eval_strategy"] == "no" and cfg.training["save_strategy"] == "no"
    assert cfg.training["bf16"] is False
