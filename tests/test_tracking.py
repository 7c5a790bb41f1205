"""Experiment tracking and feedback: MLflow (`--tracking mlflow`) and TensorBoard for training and evaluation,
progress bars, the evaluation's case count."""

from __future__ import annotations

import json
import re

import pytest
from conftest import bundle_workflow
from monai.bundle import ConfigWorkflow
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

mlflow = pytest.importorskip("mlflow")


def _workflow(tmp_path, tiny_bert_dir, configs, **override) -> ConfigWorkflow:
    return bundle_workflow(
        configs,
        "train",
        tracking="mlflow",
        ckpt_dir=str(tmp_path / "models"),
        log_dir=str(tmp_path / "logs"),
        cache_dir=str(tmp_path / "cache"),
        text_model_name=str(tiny_bert_dir),
        output_dir=f"$'{tmp_path / 'mlflow'}'",  # an expression, so MONAI can append the config file name
        **override,
    )


def test_mlflow_tracks_training_and_evaluation(tiny_bert_dir, tmp_path, capfd):
    train = _workflow(tmp_path, tiny_bert_dir, ("train.json", "demo.json"), max_epochs=1, val_interval=1)
    train.initialize()
    train.run()
    train.finalize()
    # the training progress bar over one epoch of 8 batches; tqdm redraws at most every 0.1 s, so which
    # iteration it last drew depends on the machine's speed, but every drawing names the epoch's length
    assert re.search(r"Iteration: \[[1-8]/8\]", capfd.readouterr().err)

    evaluate = _workflow(
        tmp_path,
        tiny_bert_dir,
        ("train.json", "demo.json", "evaluate.json"),
        eval_dir=str(tmp_path / "eval"),
        n_bootstrap=10,
        num_maps=0,
    )
    evaluate.initialize()
    evaluate.run()
    evaluate.finalize()
    assert "evaluating 20 cases" in capfd.readouterr().out  # the case count, before the progress bar

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = {run.info.run_id: run for run in client.search_runs(experiment.experiment_id)}
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs.values())
    train_run = next(run for run in runs.values() if "train_mean_loss" in run.data.metrics)
    eval_run = next(run for run in runs.values() if run is not train_run)
    # training: the loss of each of the 8 iterations, the epoch metric, validation under MLflow-safe names
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) == 8
    assert {"val_mean_recall", "val_recall_at_1", "val_recall_at_1_chance"} <= set(train_run.data.metrics)
    assert [a.path for a in client.list_artifacts(train_run.info.run_id)][0].startswith("config_")
    # evaluation: the headline numbers of metrics.json
    report = json.loads((tmp_path / "eval/metrics.json").read_text())
    expected = report["retrieval"]["image_to_text"]["recall@5"]["value"]
    assert eval_run.data.metrics["recall_at_5_image_to_text"] == pytest.approx(expected)
    assert eval_run.data.metrics["cases"] == report["cases"] == 20

    # TensorBoard: scalars from training and validation, images from evaluation
    tags = {"scalars": set(), "images": set()}
    for events in (tmp_path / "logs").glob("events.*"):
        accumulator = EventAccumulator(str(events), size_guidance={"images": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
    assert {"loss", "train_mean_loss", "val_mean_recall"} <= tags["scalars"]
    assert {"evaluation/recall_at_k", "evaluation/slice_bias_first_block"} <= tags["images"]


def test_mlflow_tracks_inference(sample_dir, tmp_path):
    import torch

    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "abdomen_00.nii.gz").write_bytes((sample_dir / "ct/abdomen_00.nii.gz").read_bytes())
    workflow = bundle_workflow(
        ("inference.json", "demo.json"),
        "infer",
        tracking="mlflow",
        ckpt_dir=str(tmp_path / "models"),
        dataset_dir=str(cases),
        output_dir=f"$'{tmp_path / 'out'}'",
    )
    workflow.initialize()
    (tmp_path / "models").mkdir()
    torch.save(workflow.parser.get_parsed_content("network_def").state_dict(), tmp_path / "models/model.pt")
    workflow.run()
    workflow.finalize()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out' / 'mlruns.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("monai_experiment").experiment_id)
    assert run.data.metrics == {"cases_written": 1.0, "cases_refused": 0.0}
    assert [a.path for a in client.list_artifacts(run.info.run_id)][0].startswith("config_")


def test_mlflow_metric_names():
    from scripts.engines import mlflow_metric_name

    assert mlflow_metric_name("val_recall@1_image_to_text") == "val_recall_at_1_image_to_text"
    assert mlflow_metric_name("auroc (ct_clip_18)/macro") == "auroc _ct_clip_18_/macro"
