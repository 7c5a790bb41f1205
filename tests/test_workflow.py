"""The bundle's workflows through MONAI: properties, metadata, a short run, resume, and the demo job."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out


def _workflow(bundle_root, tmp_path, configs=("train.json", "demo.json"), **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(bundle_root / "configs" / c) for c in configs],
        meta_file=str(bundle_root / "configs/metadata.json"),
        logging_file=str(bundle_root / "configs/logging.conf"),
        workflow_type="train",
        bundle_root=str(bundle_root),
        ckpt_dir=str(tmp_path / "models"),
        log_dir=str(tmp_path / "logs"),
        cache_dir=str(tmp_path / "cache"),
        **override,
    )


def test_train_config_has_every_required_property(bundle_root, sample_dir, tiny_bert_dir, tmp_path):
    workflow = _workflow(
        bundle_root, tmp_path, configs=("train.json",), dataset_dir=str(sample_dir), text_model_name=str(tiny_bert_dir)
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    # the seed configuration is train.json's default network_def
    net = workflow.parser.get_parsed_content("network_def")
    assert net.patch_embed.patch_size == (4, 16, 16) and len(net.blocks) == 12 and net.num_regions == 20


def test_metadata_is_valid_against_the_schema(bundle_root):
    verify_metadata(
        meta_file=str(bundle_root / "configs/metadata.json"),
        filepath=str(bundle_root / "tests/data/meta_schema_20240725.json"),
    )


def test_network_def_matches_metadata_shapes(bundle_root):
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle_root / "configs/metadata.json"),
        config_file=str(bundle_root / "configs/train.json"),
        device="cpu",
        n=1,
        bundle_root=str(bundle_root),
        attention_impl="reference",
    )


def _run_recording_losses(workflow: ConfigWorkflow) -> tuple[list[float], list[int]]:
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    losses, epochs = [], []

    def record(engine):
        losses.append(engine.state.metrics["train_mean_loss"])
        epochs.append(engine.state.epoch)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, record)
    workflow.run()
    workflow.finalize()
    return losses, epochs


def test_short_training_run_loss_falls_and_checkpoints_resume(bundle_root, tmp_path):
    losses, epochs = _run_recording_losses(_workflow(bundle_root, tmp_path, max_epochs=6, val_interval=3))
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert losses[-1] < 0.8 * losses[0], losses

    models = tmp_path / "models"
    fresh = _workflow(bundle_root, tmp_path)
    fresh.initialize()
    network_def = fresh.parser.get_parsed_content("network_def")
    network_def.load_state_dict(torch.load(models / "model.pt", map_location="cpu"), strict=True)
    resume = torch.load(models / "model_clip.pt", map_location="cpu", weights_only=False)
    assert set(resume) == {"model", "optimizer", "lr_scheduler", "grad_scaler", "trainer"}
    assert resume["trainer"]["iteration"] == 6 * resume["trainer"]["epoch_length"]

    _, resumed_epochs = _run_recording_losses(_workflow(bundle_root, tmp_path, max_epochs=8, val_interval=3, resume=True))
    assert resumed_epochs == [7, 8]


@pytest.mark.skipif(os.environ.get("SKIP_DEMO") == "1", reason="SKIP_DEMO=1")
def test_demo_job_ends_above_chance(bundle_root, tmp_path):
    """The README's main job, as a user runs it, on the bundled real CTs (about a minute on 2 cores)."""
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/train.json','configs/demo.json']",
        "--ckpt_dir", str(tmp_path / "models"), "--log_dir", str(tmp_path / "logs"),
        "--cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "val_mean_recall:" in line and "Metrics" in line]
    last = dict(re.findall(r"(val_\S+): ([0-9.]+)", lines[-1]))
    chance = float(last["val_recall@1_chance"])
    assert float(last["val_recall@1"]) > chance  # Recall@1, mean of both directions, on a held-out patient
    assert max(float(last["val_recall@1_image_to_text"]), float(last["val_recall@1_text_to_image"])) > chance
    assert (tmp_path / "models/model.pt").is_file() and (tmp_path / "models/model_clip.pt").is_file()
    assert "train_mean_loss" in done.stdout


def test_multi_gpu_config_trains_with_two_processes(bundle_root, tmp_path):
    """torchrun with two CPU processes (gloo): DDP with every loss term on, distributed samplers, logging
    and saving on rank 0."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/train.json','configs/demo.json','configs/ablation.json','configs/multi_gpu_train.json']",
        "--max_epochs", "2", "--val_interval", "1",
        "--ckpt_dir", str(tmp_path / "models"), "--log_dir", str(tmp_path / "logs"), "--cache_dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    output = done.stdout + done.stderr
    assert output.count("Epoch[2] Metrics -- train_mean_loss") == 1  # stats from rank 0 only
    assert "loss_local" in output and "loss_region" in output and "loss_step" in output
    assert (tmp_path / "models/model.pt").is_file() and (tmp_path / "models/model_clip.pt").is_file()
