"""Interrupted runs: a kill or an exception mid-epoch resumes to the uninterrupted result; a resume with a
changed configuration recomputes or refuses; checkpoint files are atomic and load only as weights."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bundle_workflow
from ignite.engine import Events

CONFIGS = ("train.json", "demo.json")
# 16 training crops in batches of 4: 4 steps per epoch; a tiny encoder and text tower
TINY = dict(embed_dim=32, depth=1, num_heads=2, projection_dim=16, batch_size=4, warmup_steps=2, val_interval=1,
            log_every_n_iterations=1)  # fmt: skip


@pytest.fixture(scope="module")
def small_sample(sample_dir, sample_datalist, tmp_path_factory) -> Path:
    """A datalist of 16 training and 8 validation crops of the bundled sample (absolute paths)."""
    root = tmp_path_factory.mktemp("small_sample")

    def absolute(items):
        return [dict(it, image=str(sample_dir / it["image"]), seg=str(sample_dir / it["seg"])) for it in items]

    datalist = {"training": absolute(sample_datalist["training"][:16]),
                "validation": absolute(sample_datalist["validation"][:8])}  # fmt: skip
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


def _overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt_dir, **override) -> dict:
    return dict(TINY, dataset_dir=str(small_sample), text_model_name=str(tiny_bert_dir), cache_dir=str(demo_cache_dir),
                ckpt_dir=str(ckpt_dir), log_dir=str(Path(ckpt_dir).parent / "logs"), **override)  # fmt: skip


def _train(overrides: dict, fail_at: int | None = None) -> dict:
    """Run the training workflow in this process; return per-step learning rates and losses."""
    workflow = bundle_workflow(CONFIGS, "train", **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    optimizer = workflow.parser.get_parsed_content("optimizer")
    record = {"lr": {}, "loss": {}}

    @trainer.on(Events.ITERATION_STARTED)
    def _lr(engine):
        record["lr"][engine.state.iteration] = optimizer.param_groups[0]["lr"]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _loss(engine):
        record["loss"][engine.state.iteration] = engine.state.output["loss"].item()
        if engine.state.iteration == fail_at:
            raise RuntimeError("disk full (simulated)")

    try:
        workflow.run()
    finally:
        workflow.finalize()
    return record


class _Warnings(logging.Handler):
    """Warnings of `scripts.checkpoints` (the bundle's logging.conf replaces the root handlers caplog uses)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.text = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.text += record.getMessage() + "\n"


@pytest.fixture
def resume_log():
    handler = _Warnings()
    logging.getLogger("scripts.checkpoints").addHandler(handler)
    yield handler
    logging.getLogger("scripts.checkpoints").removeHandler(handler)


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_training_state(a: Path, b: Path) -> None:
    """The checkpoint folders ``a`` and ``b`` hold the same resume state and the same best model."""
    resume_a, resume_b = _state(a / "model_clip.pt"), _state(b / "model_clip.pt")
    for name, tensor in resume_a["model"].items():
        assert torch.equal(tensor, resume_b["model"][name]), name
    for (key, sa), sb in zip(resume_a["optimizer"]["state"].items(), resume_b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa), key
    assert resume_a["trainer"]["iteration"] == resume_b["trainer"]["iteration"]
    # the best validation recall carried across the resume: the same best epoch and the same model.pt
    assert resume_a["validator"] == resume_b["validator"]
    best_a, best_b = _state(a / "model.pt"), _state(b / "model.pt")
    assert all(torch.equal(tensor, best_b[name]) for name, tensor in best_a.items())


@pytest.fixture(scope="module")
def uninterrupted(small_sample, tiny_bert_dir, demo_cache_dir, tmp_path_factory) -> tuple[dict, Path]:
    """A 3-epoch run that nothing stops: its per-step learning rates and losses, and its checkpoint folder."""
    ckpt = tmp_path_factory.mktemp("uninterrupted") / "models"
    return _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt, max_epochs=3)), ckpt


def test_resume_after_an_exception_mid_epoch_equals_the_uninterrupted_run(
    small_sample, tiny_bert_dir, demo_cache_dir, tmp_path, uninterrupted
):
    """The exception saves ``model_clip.pt`` at step 7 (epoch 2 of 3); the resume continues with the rest of
    epoch 2's data order, the random crops and the RNG streams, and ends bitwise where a run without the
    exception ends."""
    plain, plain_dir = uninterrupted
    from scripts.checkpoints import latest_resume_checkpoint

    stopped_at = tmp_path / "stopped"
    with pytest.raises(RuntimeError) as stopped:
        _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, stopped_at, max_epochs=3), fail_at=7)
    assert "simulated" in str(stopped.value.__cause__)  # MONAI's config runner wraps the run's exception
    saved = _state(stopped_at / "model_clip.pt")  # written when the exception stopped the run
    assert saved["trainer"]["iteration"] == 7 and saved["run_state"]["data_order"]["batches_done_in_epoch"] == 3
    assert latest_resume_checkpoint(stopped_at) == str(stopped_at / "model_clip.pt")  # newer than epoch 1's file
    resumed = _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, stopped_at, max_epochs=3, resume=True))
    assert sorted(resumed["loss"]) == [8, 9, 10, 11, 12]
    assert all(resumed["loss"][i] == plain["loss"][i] for i in resumed["loss"]), (resumed["loss"], plain["loss"])
    _assert_same_training_state(plain_dir, stopped_at)


def test_extending_a_finished_run_follows_the_longer_schedule(
    small_sample, tiny_bert_dir, demo_cache_dir, tmp_path, resume_log, uninterrupted
):
    """Issue 10 item 6: 2 epochs, then ``--resume True --max_epochs 3``: the schedule is the 3-epoch one from
    step 8 on (it never wraps back up to the peak), the change is logged, and a second resume has nothing left."""
    ckpt = tmp_path / "models"
    first = _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt, max_epochs=2))
    assert sorted(first["lr"]) == list(range(1, 9))
    extended = _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt, max_epochs=3, resume=True))
    assert "max_epochs 2 -> 3" in resume_log.text and "total_steps 8 -> 12" in resume_log.text
    # the learning rate of each step equals a fresh 3-epoch run's (peak 5e-4 at step 2, cosine to 0 at 12)
    fresh = uninterrupted[0]
    assert sorted(extended["lr"]) == [9, 10, 11, 12]
    assert all(extended["lr"][i] == pytest.approx(fresh["lr"][i], abs=1e-12) for i in extended["lr"])
    steps = [extended["lr"][i] for i in sorted(extended["lr"])]
    assert steps == sorted(steps, reverse=True) and max(steps) < 0.5 * 5e-4
    resume_log.text = ""
    again = _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt, max_epochs=3, resume=True))
    assert again["lr"] == {} and "all 3 epochs are already done, nothing left to do" in resume_log.text
    with pytest.raises(RuntimeError) as fewer:
        _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt, max_epochs=2, resume=True))
    assert "trained 3 epochs and max_epochs is now 2" in str(fewer.value.__cause__)

    # a new batch size at an epoch boundary: counters rescaled to the new epoch length, schedule recomputed
    resume_log.text = ""
    rescaled = _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt, max_epochs=4, batch_size=8,
                                 learning_rate=1e-3, resume=True))  # fmt: skip
    assert "batch_size 4 -> 8" in resume_log.text and "epoch_length 4 -> 2" in resume_log.text
    assert "learning_rates [0.0005, 0.0005] -> [0.001, 0.001]" in resume_log.text
    assert sorted(rescaled["lr"]) == [7, 8]  # 3 epochs of 2 steps done, epoch 4 = steps 7 and 8
    # the schedule of the current configuration: 8 steps, warm-up 2, base 1e-3, at step 6
    import math

    assert rescaled["lr"][7] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (6 - 2) / (8 - 2))))


def test_a_changed_epoch_length_in_the_middle_of_an_epoch_is_refused(
    small_sample, tiny_bert_dir, demo_cache_dir, tmp_path
):
    ckpt = tmp_path / "models"
    with pytest.raises(RuntimeError):
        _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt, max_epochs=2, val_interval=5),
               fail_at=3)  # fmt: skip
    with pytest.raises(RuntimeError) as refused:
        _train(_overrides(small_sample, tiny_bert_dir, demo_cache_dir, ckpt, max_epochs=2, val_interval=5,
                          batch_size=8, resume=True))  # fmt: skip
    message = str(refused.value.__cause__)
    assert "stopped after batch 3 of 4 in epoch 1" in message and "batch_size 4 -> 8" in message
    assert "epoch_length 4 -> 2" in message
    assert "model_clip_checkpoint_epoch=N.pt" in message


def _cli(overrides: dict, *extra_configs: str) -> list[str]:
    configs = [f"configs/{c}" for c in CONFIGS] + list(extra_configs)
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", repr(configs)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def _step_losses(stdout: str) -> dict[tuple[int, int], str]:
    """``(epoch, iteration in epoch) -> loss`` as the console prints it (4 decimals)."""
    found = re.findall(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- loss: ([0-9.]+)", stdout)
    return {(int(e), int(i)): loss for e, i, loss in found}


def test_sigkill_mid_epoch_then_the_same_command_with_resume_equals_an_uninterrupted_run(
    bundle_root, small_sample, tiny_bert_dir, demo_cache_dir, tmp_path, uninterrupted
):
    """The README's command, killed with SIGKILL at step 10 (epoch 3 of 3), rerun with ``--resume True``:
    it continues from the epoch-2 checkpoint and ends with the same weights and losses as a run that was
    never killed; only one per-epoch file is left (``n_saved=1`` holds across the resume)."""
    kill = tmp_path / "kill_at_step_10.json"
    kill.write_text(json.dumps({
        "+imports": ["$import signal", "$from ignite.engine import Events"],
        "+initialize": ["$@train#trainer.add_event_handler(Events.ITERATION_COMPLETED(once=10), "
                        "lambda engine: os.kill(os.getpid(), signal.SIGKILL))"],
    }))  # fmt: skip
    killed_dir = tmp_path / "killed"
    killed_args = _overrides(small_sample, tiny_bert_dir, demo_cache_dir, killed_dir, max_epochs=3)
    killed = subprocess.run(_cli(killed_args, str(kill)), cwd=bundle_root, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (killed_dir / "model_clip.pt").exists()  # a kill leaves only the per-epoch file
    assert [p.name for p in killed_dir.glob("model_clip_checkpoint_epoch=*.pt")] == ["model_clip_checkpoint_epoch=2.pt"]

    resumed = subprocess.run(_cli(dict(killed_args, resume=True)), cwd=bundle_root, capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    after = _step_losses(resumed.stdout + resumed.stderr)
    assert sorted(after) == [(3, 1), (3, 2), (3, 3), (3, 4)]
    plain, plain_dir = uninterrupted  # the same configuration, run in this process without a kill
    assert all(after[(3, i)] == f"{plain['loss'][8 + i]:.4f}" for i in range(1, 5)), (after, plain["loss"])
    _assert_same_training_state(plain_dir, killed_dir)
    assert sorted(p.name for p in killed_dir.glob("model_clip_checkpoint_epoch=*.pt")) == [
        "model_clip_checkpoint_epoch=3.pt"
    ]


def _save_then_die_during_the_next_save(ckpt_dir: str) -> None:
    """In a forked child: an epoch-1 checkpoint and ``model_clip.pt``, then a kill half-way through epoch 2's save."""
    from ignite.engine import Engine
    from scripts.checkpoints import AtomicCheckpointSaver

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saver = AtomicCheckpointSaver(ckpt_dir, {"model": model, "optimizer": optimizer}, file_prefix="model_clip",
                                  save_final=True, final_filename="model_clip.pt", save_interval=1, n_saved=1)  # fmt: skip
    engine = Engine(lambda e, b: None)
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    with torch.no_grad():
        model.weight.fill_(7.0)

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint" * 1000)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    engine.run([0], max_epochs=2)


def test_a_kill_during_a_save_leaves_the_previous_checkpoints_loadable(tmp_path):
    from scripts.checkpoints import latest_resume_checkpoint

    child = multiprocessing.get_context("fork").Process(
        target=_save_then_die_during_the_next_save, args=(str(tmp_path),)
    )
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    # MONAI's own saver would have deleted the epoch-1 file before writing epoch 2, and written in place
    survivors = {p.name: torch.load(p, weights_only=True) for p in tmp_path.glob("model_clip*.pt")}
    assert set(survivors) == {"model_clip.pt", "model_clip_checkpoint_epoch=1.pt"}
    for state in survivors.values():
        assert not torch.equal(state["model"]["weight"], torch.full((4, 4), 7.0))
    assert Path(latest_resume_checkpoint(tmp_path)).name in survivors  # the partial file is never a candidate
    assert [p.name for p in tmp_path.glob(".*.partial")] == [".model_clip_checkpoint_epoch=2.pt.partial"]


class _RunsCode:
    """A pickle that calls ``os.system`` when it is unpickled."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    from ignite.engine import Engine
    from scripts.checkpoints import SafeCheckpointLoader, UnsafeCheckpointError, load_checkpoint

    marker = tmp_path / "code_ran"
    path = tmp_path / "model_clip.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "extra": _RunsCode(f"touch {marker}")}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"model_clip.pt: refused to load: .*could run code"):
        load_checkpoint(path)
    engine = Engine(lambda e, b: None)
    SafeCheckpointLoader(str(path), {"model": torch.nn.Linear(2, 2)}).attach(engine)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True; load only checkpoint files you trust"):
        engine.run([0], max_epochs=1)
    assert not marker.exists()


def _tiny_clip(region_map, tiny_bert_dir):
    from conftest import tiny_encoder
    from scripts.networks import CTReportCLIP, HFTextEncoder

    torch.manual_seed(0)
    encoder = tiny_encoder(region_map, projection_heads=("global",))
    return CTReportCLIP(encoder, HFTextEncoder(str(tiny_bert_dir), projection_dim=16, pooling="mean", trainable=False))


def _batches(region_map, n: int) -> list[dict]:
    """``n`` batches of 2 cases: packed input (2, 2, 8, 32, 32) with a liver-and-spleen label map."""
    from conftest import packed_input

    label_map = torch.zeros(2, 1, 8, 32, 32, dtype=torch.long)
    label_map[:, :, :, :16] = 5  # liver
    label_map[:, :, :, 16:] = 1  # spleen
    return [
        {"image": packed_input(label_map, seed=b), "text": [f"liver {b}", f"spleen {b}"], "study": [f"s{b}a", f"s{b}b"],
         "case_id": [f"case_{b}_0", f"case_{b}_1"], "case_index": torch.tensor([2 * b, 2 * b + 1])}
        for b in range(n)
    ]  # fmt: skip


class _LossBrokenAt:
    """`MultiLevelLoss` whose total is NaN on the listed calls (1-based), as a bf16 overflow would make it."""

    def __init__(self, calls: set[int]) -> None:
        from scripts.losses import MultiLevelLoss

        self.loss, self.calls, self.count = MultiLevelLoss(global_weight=1.0), calls, 0
        self.enabled = self.loss.enabled

    def __call__(self, **inputs) -> dict:
        self.count += 1
        terms = self.loss(**inputs)
        if self.count in self.calls:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


def test_a_nonfinite_step_is_skipped_counted_and_named(region_map, tiny_bert_dir, caplog):
    from scripts.engines import ContrastiveTrainer
    from torch.utils.data import DataLoader

    model = _tiny_clip(region_map, tiny_bert_dir)
    loader = DataLoader(_batches(region_map, 4), batch_size=1, collate_fn=lambda items: items[0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    trainer = ContrastiveTrainer("cpu", 2, loader, model, optimizer, _LossBrokenAt({2}), max_grad_norm=1.0)
    weights = {}

    @trainer.on(Events.ITERATION_STARTED)
    def _before(engine):
        weights[("before", engine.state.iteration)] = model.image_encoder.global_head.weight.detach().clone()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _after(engine):
        weights[("after", engine.state.iteration)] = model.image_encoder.global_head.weight.detach().clone()

    with caplog.at_level("WARNING"):
        trainer.run()
    assert trainer.state.nonfinite_steps_skipped == 1
    assert torch.equal(weights[("before", 2)], weights[("after", 2)])  # the skipped step changed nothing
    assert not torch.equal(weights[("before", 3)], weights[("after", 3)])  # the next one trains
    assert "iteration 2: loss nan" in caplog.text and "['case_1_0', 'case_1_1']" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # an infinite gradient with a finite loss is skipped too
    hook = model.image_encoder.global_head.weight.register_hook(lambda grad: grad * float("inf"))
    trainer = ContrastiveTrainer("cpu", 1, loader, model, optimizer, _LossBrokenAt(set()), max_grad_norm=None,
                                 max_consecutive_nonfinite_steps=2)  # fmt: skip
    with pytest.raises(FloatingPointError, match="More than max_consecutive_nonfinite_steps=2 skipped steps in a row"):
        trainer.run()
    hook.remove()
    assert trainer.state.nonfinite_steps_skipped == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_nonfinite_state_is_never_saved(region_map, tiny_bert_dir, tmp_path):
    from ignite.metrics import Average
    from scripts.checkpoints import AtomicCheckpointSaver, RunState
    from scripts.engines import ContrastiveEvaluator, ContrastiveTrainer
    from torch.utils.data import DataLoader

    model = _tiny_clip(region_map, tiny_bert_dir)
    loader = DataLoader(_batches(region_map, 2), batch_size=1, collate_fn=lambda items: items[0])
    with torch.no_grad():
        model.image_encoder.global_head.weight[0, 0] = float("nan")
    evaluator = ContrastiveEvaluator(
        "cpu",
        loader,
        model,
        key_val_metric={"val_mean": Average(output_transform=lambda x: x["image_embedding"].sum())},
    )
    AtomicCheckpointSaver(str(tmp_path), {"model": model}, save_key_metric=True, key_metric_filename="model.pt").attach(
        evaluator
    )
    with pytest.raises(FloatingPointError, match=r"not finite for cases \['case_0_0', 'case_0_1'\]"):
        evaluator.run()
    assert not (tmp_path / "model.pt").exists()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = ContrastiveTrainer("cpu", 1, loader, model, optimizer, _LossBrokenAt(set()))
    with pytest.raises(FloatingPointError, match="refusing to save a checkpoint: parameter image_encoder.global_head"):
        RunState(trainer, optimizer, None, model).state_dict()
