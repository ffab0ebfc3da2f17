"""training.report_to with every tracker at once, offline, through the real libraries (the `trackers`
extra): one tiny run, then what each library wrote is read back from the run folder: chatlora's
config, the training loss of each logged step, and the generation monitor's held-out replies as a
table."""

from __future__ import annotations

import json

import pytest

from conftest import losses, quiet_train, tiny_config

pytest.importorskip("wandb")
pytest.importorskip("swanlab")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    env = {"WANDB_MODE": "offline", "SWANLAB_MODE": "offline", "WANDB_SILENT": "true"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("MLFLOW_TRACKING_URI", "SWANLAB_LOG_DIR", "WANDB_DIR", "WANDB_PROJECT"):
            mp.delenv(key, raising=False)
        cfg = tiny_config(tiny_model_dir, tmp_path_factory.mktemp("tracked"), "data.validation=0.3", "eval.steps=2",
                          "eval.max_new_tokens=8", "training.report_to=[tensorboard, wandb, swanlab, mlflow]")
        return quiet_train(cfg).path


def test_wandb_offline(tracked_run):
    # wandb's own reader of its .wandb log went with its Go core; SwanLab ships one (to import W&B runs).
    from swanlab.converter.wb.wbdatastore import WBDataStoreReader
    from wandb.proto import wandb_internal_pb2

    (run_file,) = (tracked_run / "wandb").glob("offline-run-*/run-*.wandb")
    store = WBDataStoreReader()
    store.open(run_file)
    history, config = [], {}
    while (data := store.scan()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.HasField("history"):
            row: dict = {}
            for item in record.history.item:  # a table's fields come as nested keys: [held_out/replies, nrows]
                *parents, key = [item.key] if item.key else list(item.nested_key)
                target = row.setdefault(parents[0], {}) if parents else row
                target[key] = json.loads(item.value_json)
            history.append(row)
        for update in (record.run.config.update if record.HasField("run") else record.config.update):
            config[update.key] = json.loads(update.value_json)
    assert config["chatlora"]["lora"]["r"] == 4 and config["chatlora"]["eval"]["steps"] == 2
    logged = [h["train/loss"] for h in history if "train/loss" in h]
    assert logged == pytest.approx(losses(tracked_run))
    tables = [h["held_out/replies"] for h in history if "held_out/replies" in h]
    assert len(tables) == 2 and all(t["_type"] == "table-file" and t["nrows"] == 3 for t in tables)
    (media,) = {t["path"] for t in tables[-1:]}
    table = json.loads(next((tracked_run / "wandb").glob(f"offline-run-*/files/{media}")).read_text())
    assert table["columns"] == ["step", "prompt", "reply", "stopped", "tokens"] and table["data"][0][0] == 4


def test_swanlab_offline(tracked_run):
    import yaml
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (folder,) = (tracked_run / "swanlog").glob("run-*")
    config = yaml.safe_load((folder / "files" / "config.yaml").read_text())
    assert config["chatlora"]["value"]["lora"]["r"] == 4
    reader = DataStoreReader()
    reader.open(next(folder.glob("run-*.swanlab")))
    scalars, media = {}, []
    for data in reader:
        record = Record()
        record.ParseFromString(data)
        if record.HasField("scalar"):
            scalars.setdefault(record.scalar.key, []).append(record.scalar.value.number)
        if record.HasField("media") and record.media.key == "held_out/replies":
            media.append(record.media.value.items[0].filename)
    assert scalars["train/loss"] == pytest.approx(losses(tracked_run))
    assert len(media) == 2
    table = json.loads(next(folder.glob(f"media/**/{media[-1]}")).read_text())
    assert [c["field"] for c in table["colDefs"]] == ["step", "prompt", "reply", "stopped", "tokens"]
    assert len(table["rowData"]) == 3 and table["rowData"][0]["step"] == 4


def test_mlflow_file_store(tracked_run):
    import mlflow

    client = mlflow.MlflowClient((tracked_run / "mlruns").absolute().as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "chatlora"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == tracked_run.name and run.data.params["learning_rate"] == "0.01"
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert history == pytest.approx(losses(tracked_run))
    folder = tracked_run / "mlruns" / experiment.experiment_id / run.info.run_id / "artifacts"
    assert json.loads((folder / "chatlora_config.json").read_text())["lora"]["r"] == 4
    table = json.loads((folder / "held_out_replies.json").read_text())
    assert table["columns"] == ["step", "prompt", "reply", "stopped", "tokens"]
    assert [row[0] for row in table["data"]] == [2] * 3 + [4] * 3


def test_tensorboard_gets_the_config_and_replies(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = events.Tags()["tensors"]
    assert "chatlora/config/text_summary" in tags and "held_out/replies/text_summary" in tags
    replies = events.Tensors("held_out/replies/text_summary")
    assert [e.step for e in replies] == [2, 4]
    assert b"| step | prompt | reply | stopped | tokens |" in replies[-1].tensor_proto.string_val[0]
