"""The bundle's workflows through MONAI: properties, metadata, a short run, resume, and the demo job."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import bundle_parser, bundle_workflow, run_with_hang_guard
from ignite.engine import Events
from monai.bundle import ConfigWorkflow, verify_metadata, verify_net_in_out


def _workflow(tmp_path, configs=("train.json", "demo.json"), **override) -> ConfigWorkflow:
    return bundle_workflow(
        configs,
        "train",
        ckpt_dir=str(tmp_path / "models"),
        log_dir=str(tmp_path / "logs"),
        cache_dir=str(tmp_path / "cache"),
        **override,
    )


def test_train_config_has_every_required_property(sample_dir, tiny_bert_dir, tmp_path):
    workflow = _workflow(
        tmp_path, configs=("train.json",), dataset_dir=str(sample_dir), text_model_name=str(tiny_bert_dir)
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


def test_key_metric_state_keeps_the_best_checkpoint_across_a_resume(tmp_path):
    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver
    from scripts.checkpoints import KeyMetricState, latest_resume_checkpoint

    def validator_with_metric(values):
        engine = Engine(lambda e, b: None)
        engine.state.best_metric, engine.state.best_metric_epoch = -1, -1

        @engine.on(Events.EPOCH_COMPLETED)
        def _metric(e):
            e.state.metrics = {"val_mean_recall": values[e.state.epoch - 1]}

        saver = CheckpointSaver(str(tmp_path), {"model": torch.nn.Linear(1, 1)}, save_key_metric=True,
                                key_metric_name="val_mean_recall", key_metric_filename="model.pt")  # fmt: skip
        saver.attach(engine)
        return engine, saver

    best = tmp_path / "model.pt"
    best.write_bytes(b"best of the first run")
    engine, saver = validator_with_metric([0.5, 0.4])
    KeyMetricState(engine, {"model.pt": saver}, tmp_path).load_state_dict({"best_metric": 0.6, "best_metric_epoch": 3})
    assert engine.state.best_metric == 0.6
    engine.run([0], max_epochs=2)
    assert best.read_bytes() == b"best of the first run"  # 0.5 and 0.4 after a best of 0.6: nothing replaced
    engine, saver = validator_with_metric([0.7])
    KeyMetricState(engine, {"model.pt": saver}, tmp_path).load_state_dict({"best_metric": 0.6, "best_metric_epoch": 3})
    engine.run([0], max_epochs=1)
    assert best.read_bytes() != b"best of the first run"  # better than the restored best: replaced
    best.unlink()
    engine, saver = validator_with_metric([0.5])
    KeyMetricState(engine, {"model.pt": saver}, tmp_path).load_state_dict({"best_metric": 0.6, "best_metric_epoch": 3})
    engine.run([0], max_epochs=1)
    assert best.is_file()  # the file was gone: the resumed run saves its own best
    # the newest resume file wins, whatever its name
    assert latest_resume_checkpoint(tmp_path / "none") == str(tmp_path / "none" / "model_clip.pt")
    (tmp_path / "model_clip.pt").write_bytes(b"old")
    os.utime(tmp_path / "model_clip.pt", (1, 1))
    (tmp_path / "model_clip_checkpoint_epoch=7.pt").write_bytes(b"new")
    assert latest_resume_checkpoint(tmp_path).endswith("model_clip_checkpoint_epoch=7.pt")


@pytest.mark.skipif(os.environ.get("SKIP_DEMO") == "1", reason="SKIP_DEMO=1")
def test_demo_job_ends_above_chance(bundle_root, tmp_path, demo_cache_dir):
    """The README's main job, as a user runs it, on the bundled real CTs (about a minute on 2 idle cores; no
    time limit: a slow machine only makes it slower): above chance on a held-out patient, the training loss
    falls, and the checkpoints load as documented."""
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/train.json','configs/demo.json']",
        "--ckpt_dir", str(tmp_path / "models"), "--log_dir", str(tmp_path / "logs"),
        "--cache_dir", str(demo_cache_dir),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "val_mean_recall:" in line and "Metrics" in line]
    last = dict(re.findall(r"(val_\S+): ([0-9.]+)", lines[-1]))
    chance = float(last["val_recall@1_chance"])
    assert float(last["val_recall@1"]) > chance  # Recall@1, mean of both directions, on a held-out patient
    assert max(float(last["val_recall@1_image_to_text"]), float(last["val_recall@1_text_to_image"])) > chance
    epochs = re.findall(r"Epoch\[(\d+)\] Metrics -- train_mean_loss: ([0-9.]+)", done.stdout)
    assert [int(epoch) for epoch, _ in epochs] == list(range(1, 41))
    assert float(epochs[-1][1]) < 0.8 * float(epochs[0][1]), epochs  # the training loss falls
    # model.pt is a strict state dict of network_def; model_clip.pt holds what a resume needs, as weights only
    models = tmp_path / "models"
    network_def = bundle_parser("train.json", "demo.json").get_parsed_content("network_def")
    network_def.load_state_dict(torch.load(models / "model.pt", map_location="cpu", weights_only=True), strict=True)
    resume = torch.load(models / "model_clip.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "grad_scaler", "trainer", "validator", "run_state"} <= set(resume)
    assert resume["trainer"]["iteration"] == 40 * resume["trainer"]["epoch_length"]
    assert 5 <= resume["validator"]["best_metric_epoch"] <= 40 and 0 <= resume["validator"]["best_metric"] <= 1


def test_multi_gpu_training_stops_every_rank_when_one_raises_and_resumes(
    bundle_root, tmp_path, tiny_bert_dir, demo_cache_dir
):
    """torchrun with two CPU processes (gloo): DDP with every loss term on, distributed samplers, logging and
    saving on rank 0. Rank 1 raises in epoch 2 while rank 0 waits in a collective: the run ends on both
    ranks with rank 1's message; the same command with ``--resume True`` then finishes epoch 2."""
    fail = tmp_path / "rank1_fails.json"
    fail.write_text(json.dumps({
        "+imports": ["$from ignite.engine import Events"],
        "+initialize": ["$@train#trainer.add_event_handler(Events.ITERATION_STARTED(once=6), lambda engine: "
                        "(_ for _ in ()).throw(RuntimeError('cases refused beyond max_bad_fraction (simulated)')) "
                        "if torch.distributed.get_rank() == 1 else None)"],
    }))  # fmt: skip
    configs = ["configs/train.json", "configs/demo.json", "configs/ablation.json", "configs/multi_gpu_train.json"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
        "--max_epochs", "2", "--val_interval", "1", "--log_every_n_iterations", "1", "--text_model_name", str(tiny_bert_dir),
        "--ckpt_dir", str(tmp_path / "models"), "--log_dir", str(tmp_path / "logs"), "--cache_dir", str(demo_cache_dir),
    ]  # fmt: skip
    failed = run_with_hang_guard(command + ["--config_file", repr(configs + [str(fail)])], bundle_root)
    output = failed.stdout + failed.stderr
    assert failed.returncode != 0 and "cases refused beyond max_bad_fraction (simulated)" in output, output[-3000:]
    assert output.count("Epoch[1] Metrics -- train_mean_loss") == 1  # epoch 1 finished (4 steps per rank)
    assert "Epoch[2] Metrics -- train_mean_loss" not in output
    assert (tmp_path / "models/model_clip_checkpoint_epoch=1.pt").is_file()

    resumed = run_with_hang_guard(command + ["--config_file", repr(configs), "--resume", "True"], bundle_root)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    steps = re.findall(r"Epoch: (\d+)/2, Iter: (\d)/4", output)
    # from epoch 1's checkpoint, or from rank 0's model_clip.pt of the stop (its failed step not counted)
    assert steps[0] in (("2", "1"), ("2", "2")) and steps[-1] == ("2", "4"), steps
    assert "Epoch[1] Metrics" not in output
    assert output.count("Epoch[2] Metrics -- train_mean_loss") == 1  # stats from rank 0 only
    assert "loss_local" in output and "loss_region" in output and "loss_step" in output
    assert (tmp_path / "models/model.pt").is_file() and (tmp_path / "models/model_clip.pt").is_file()
    assert [p.name for p in (tmp_path / "models").glob("model_clip_checkpoint_epoch=*.pt")] == [
        "model_clip_checkpoint_epoch=2.pt"
    ]


def test_training_list_smaller_than_a_batch_is_an_error():
    from scripts.engines import ContrastiveTrainer
    from torch.utils.data import DataLoader

    net = torch.nn.Linear(1, 1)
    loader = DataLoader(list(range(3)), batch_size=8, drop_last=True)
    with pytest.raises(ValueError, match="yields no batch: 3 items .* batch_size 8 and drop_last=True"):
        ContrastiveTrainer("cpu", 1, loader, net, torch.optim.SGD(net.parameters(), lr=0.1), lambda *a: 0)
