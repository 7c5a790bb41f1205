"""Checkpoints of a training run: atomic files, safe loading, and everything a resume needs.

A resume continues a run as if it had not stopped: the resume file (``model_clip.pt`` or
``model_clip_checkpoint_epoch=N.pt``) holds the model, optimizer, scheduler, grad scaler and trainer
counters (MONAI / Ignite state dicts), the validator's best key metric (`KeyMetricState`) and `RunState`:
the random number generator states, the data order and the configuration that the schedule and the
epoch length were computed from. Files are written atomically (`AtomicCheckpointSaver`) and read back
with ``weights_only=True`` (`SafeCheckpointLoader`), so a checkpoint that would run code is refused.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.data import DistributedSampler
from monai.handlers import CheckpointLoader, CheckpointSaver

logger = logging.getLogger(__name__)

RESUME_FILE = "model_clip.pt"
EPOCH_FILES = "model_clip_checkpoint_epoch=*.pt"
# configuration entries of `RunState` that decide the data order within an epoch
ORDER_KEYS = ("epoch_length", "batch_size", "cases", "processes", "sampler_seed")


def latest_resume_checkpoint(ckpt_dir: str | Path) -> str:
    """The most recently written resume checkpoint in ``ckpt_dir``.

    Candidates are ``model_clip.pt`` (written when a run ends or stops on an exception) and the per-epoch
    ``model_clip_checkpoint_epoch=N.pt`` (what is left after a kill); files of earlier runs stay beside
    them, so the newest by modification time wins. With none there, the ``model_clip.pt`` path is
    returned and the loader's error names it.
    """
    ckpt_dir = Path(ckpt_dir)
    candidates = [p for p in [ckpt_dir / RESUME_FILE, *ckpt_dir.glob(EPOCH_FILES)] if p.is_file()]
    if not candidates:
        return str(ckpt_dir / RESUME_FILE)
    return str(max(candidates, key=lambda p: p.stat().st_mtime_ns))


# ----------------------------------------------------------------------------------------------------
# writing and reading checkpoint files
# ----------------------------------------------------------------------------------------------------


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds objects that only a full unpickle (which can run code) would restore."""


def load_checkpoint(path: str | Path, map_location=None):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only.

    Raises:
        UnsafeCheckpointError: the file holds other objects (a pickle that would import or call
            something); the message names the file and what the unpickler refused.
        FileNotFoundError: no such file.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unsafe(path, err) from err


def _unsafe(path, err: BaseException) -> UnsafeCheckpointError:
    detail = str(err).strip().splitlines()
    refused = next((line for line in detail if "Unsupported" in line or "GLOBAL" in line), detail[0] if detail else "")
    return UnsafeCheckpointError(
        f"{path}: refused to load: the file holds objects other than tensors, numbers, strings and containers "
        f"({refused.strip()}); unpickling them could run code. This bundle's checkpoints load with "
        "weights_only=True; load only checkpoint files you trust"
    )


class AtomicDiskSaver(BaseSaveHandler):
    """Ignite save handler that never leaves a half-written or missing checkpoint behind.

    A file is written to ``.<name>.partial`` in the same folder, flushed to disk, then renamed over the
    target (``os.replace`` is atomic on POSIX and Windows); a kill during the save leaves the previous
    file as it was. Removals that Ignite asks for before a save (the older epoch file, or the fixed-name
    file it is about to replace) wait until the new file is in place.

    Args:
        dirname: the checkpoint folder (created if missing).
        filename: a fixed file name used for every save (MONAI's ``final_filename`` /
            ``key_metric_filename``), or ``None`` for Ignite's names.
    """

    def __init__(self, dirname: str | Path, filename: str | None = None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename
        self._pending_removals: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        self.dirname.mkdir(parents=True, exist_ok=True)
        path = self.dirname / (self.filename or filename)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        _fsync_dir(self.dirname)
        for name in self._pending_removals:
            if name != path.name:
                (self.dirname / name).unlink(missing_ok=True)
        self._pending_removals = []

    def remove(self, filename: str) -> None:
        self._pending_removals.append(self.filename or filename)


def _fsync_dir(dirname: Path) -> None:
    """Make a rename in ``dirname`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(dirname, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI `CheckpointSaver` whose files are written atomically (`AtomicDiskSaver`), and whose
    ``n_saved`` rule holds across resumes.

    MONAI's saver writes in place and deletes the previous file first (``atomic=False``), so a kill
    during a save can leave no loadable checkpoint. Here every file (final, key metric, per epoch) is
    replaced atomically. A resumed run adopts the per-epoch files (``{file_prefix}_checkpoint_epoch=N.pt``)
    of the epochs already done: the newest ``n_saved`` are tracked and replaced in turn, older ones are
    deleted, so resuming never piles up per-epoch files. An exception before the run has trained a step
    (a refused resume, a configuration error) saves nothing: the checkpoint it was resuming from stays as
    it was. The arguments are the parent's (epoch-level saving; the best-metric files take the
    validator's key metric).
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: str | None = None,
        save_key_metric: bool = False,
        key_metric_filename: str | None = None,
        save_interval: int = 0,
        n_saved: int | None = None,
    ) -> None:
        super().__init__(
            save_dir=save_dir,
            save_dict=save_dict,
            file_prefix=file_prefix,
            save_final=save_final,
            final_filename=final_filename,
            save_key_metric=save_key_metric,
            key_metric_filename=key_metric_filename,
            save_interval=save_interval,
            n_saved=n_saved,
        )
        for checkpoint, filename in (
            (self._final_checkpoint, final_filename),
            (self._key_metric_checkpoint, key_metric_filename),
            (self._interval_checkpoint, None),
        ):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename)
        self._file_prefix = file_prefix
        self._adopted = False
        self._steps_this_run = 0

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(Events.STARTED, self._count_steps, 0)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count_steps, 1)
        if self._interval_checkpoint is not None and self.epoch_level:
            engine.add_event_handler(Events.EPOCH_STARTED, self._adopt_epoch_files)

    def _count_steps(self, engine: Engine, step: int) -> None:
        self._steps_this_run = self._steps_this_run + step if step else 0

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        if self._steps_this_run == 0:
            raise e  # nothing trained in this run: keep the checkpoint on disk as it is
        super().exception_raised(engine, e)

    def _adopt_epoch_files(self, engine: Engine) -> None:
        if self._adopted:
            return
        self._adopted = True
        n_saved, done = self._interval_checkpoint.n_saved, engine.state.epoch - 1
        if n_saved is None or done < 1:
            return  # a fresh run: files of another run are not this run's to replace
        found = []
        for path in Path(self.save_dir).glob(f"{self._file_prefix}_checkpoint_epoch=*.pt"):
            epoch = path.stem.rsplit("=", 1)[-1]
            if epoch.isdigit() and int(epoch) <= done:
                found.append((int(epoch), path.name))
        found.sort()
        keep, stale = found[-n_saved:], found[:-n_saved]
        for _, name in stale:
            (Path(self.save_dir) / name).unlink(missing_ok=True)
        if stale:
            logger.info(f"resume: removed {[n for _, n in stale]} (n_saved={n_saved} per-epoch checkpoints kept)")
        self._interval_checkpoint._saved = sorted(
            [Checkpoint.Item(epoch, name) for epoch, name in keep] + list(self._interval_checkpoint._saved),
            key=lambda item: item.priority,
        )


class SafeCheckpointLoader(CheckpointLoader):
    """MONAI `CheckpointLoader` (which reads with ``weights_only=True``) that names an unsafe file
    clearly, and lets loaded objects finish the resume once everything is loaded.

    After all objects of ``load_dict`` are restored, each that has ``resume_completed(engine, path)``
    (`RunState`) gets that call, so it can reconcile the restored state with the current configuration
    whatever its position in ``load_dict``. The arguments are the parent's.

    Raises:
        UnsafeCheckpointError: the file holds objects that a ``weights_only`` load refuses.
    """

    def __call__(self, engine: Engine) -> None:
        try:
            super().__call__(engine)
        except pickle.UnpicklingError as err:
            raise _unsafe(self.load_path, err) from err
        for obj in self.load_dict.values():
            if hasattr(obj, "resume_completed"):
                obj.resume_completed(engine, self.load_path)


# ----------------------------------------------------------------------------------------------------
# state that travels in the resume file
# ----------------------------------------------------------------------------------------------------


class KeyMetricState:
    """The validator's best key metric as a checkpoint entry, so that a resumed run keeps its best model.

    Without it a resumed validator starts from "no best yet" and the first validation after the resume,
    however poor, overwrites ``model.pt`` and ``model_clip_best.pt``. Put it in the resume checkpoint's
    ``save_dict`` (it has `state_dict` / `load_state_dict`); loading sets the validator's ``best_metric``
    and ``best_metric_epoch`` and the tracking list of each key-metric `monai.handlers.CheckpointSaver`,
    so only a better epoch replaces the saved files.

    Args:
        evaluator: the validator (a MONAI `Workflow` with a key metric).
        savers: ``{file name: CheckpointSaver or None}``, the key-metric savers attached to ``evaluator``
            (``None`` on ranks that save nothing).
        save_dir: where the savers write; a saver whose file is not there starts afresh (nothing to protect).
    """

    def __init__(
        self, evaluator: Engine, savers: Mapping[str, object | None] | None = None, save_dir: str | Path = "."
    ) -> None:
        self.evaluator = evaluator
        self.savers = dict(savers or {})
        self.save_dir = Path(save_dir)

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state_dict: Mapping) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])
        if self.evaluator.state.best_metric_epoch < 0:
            return  # no validation before the checkpoint: nothing saved to protect
        for filename, saver in self.savers.items():
            # ignite's `Checkpoint.state_dict()` format: [(priority, filename)]
            if saver is not None and (self.save_dir / filename).is_file():
                saver.load_state_dict({"_saved": [(self.evaluator.state.best_metric, filename)]})


class ResumableSampler(DistributedSampler):
    """MONAI `DistributedSampler` whose order is a function of ``(seed, epoch)`` and that can start its
    next pass part-way, so a run resumed in the middle of an epoch sees the rest of that epoch's order.

    Also the single-process training sampler (``num_replicas=1, rank=0``): the data order then depends on
    nothing but the seed and the epoch (MONAI's workflow calls `set_epoch` at each epoch start), never on
    how much of the global random stream other code has drawn. The arguments are the parent's; ``None``
    for ``num_replicas`` and ``rank`` takes them from the process group.
    """

    def __init__(
        self,
        dataset,
        even_divisible: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset=dataset, even_divisible=even_divisible, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
            seed=seed,
        )  # fmt: skip
        self._skip = 0

    def skip_next(self, n_items: int) -> None:
        """Leave out the first ``n_items`` of this rank's next pass (that many were trained on before the stop)."""
        self._skip = int(n_items)

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(list(super().__iter__())[skip:])


def _random_states(obj, found: list | None = None, seen: set | None = None) -> list[np.random.RandomState]:
    """Every ``numpy.random.RandomState`` a MONAI transform chain draws from (each `Randomizable`'s
    ``R``), in a fixed order: attributes sorted by name, lists in order."""
    found = [] if found is None else found
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, np.random.RandomState):
        found.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _random_states(item, found, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, torch.Tensor, type)):
        for key in sorted(vars(obj)):
            _random_states(vars(obj)[key], found, seen)
    return found


def _numpy_state(state: tuple) -> dict:
    """``RandomState.get_state()`` as tensors and numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip


def _numpy_tuple(state: Mapping) -> tuple:
    keys = state["keys"].cpu().numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


class RunState:
    """What a resume needs beyond the model, optimizer, scheduler, scaler and trainer counters.

    ``state_dict()`` holds (tensors, numbers, strings and lists only, so it loads with ``weights_only=True``):

    - ``rng``: the torch CPU (and CUDA) generator states, numpy's and Python's global states, and the
      ``RandomState`` of every random transform of the training data (random crops; in-process with
      ``num_workers=0``, reseeded per epoch from the torch state otherwise). Under DDP these are rank 0's
      (the rank that saves); every rank restores them.
    - ``data_order``: the last iteration whose optimizer step was taken (an exception inside an iteration,
      e.g. a collective whose peer died, comes before its step: that batch is trained again), the epochs
      done and the batches of the current epoch already trained on; the order itself is a function of
      the sampler's seed and the epoch (`ResumableSampler`), so the resumed epoch continues with the rest
      of that epoch's order.
    - ``configuration``: max_epochs, epoch length, batch size, training cases, processes, learning rates,
      weight decays, warm-up and total scheduler steps and the sampler seed, as the run was configured.
    - ``nonfinite_steps_skipped``: steps skipped for a non-finite loss or gradient (`ContrastiveTrainer`).

    A resume (`SafeCheckpointLoader` calls `resume_completed` after everything is loaded) restores the
    RNG and data order and reconciles the restored schedule with the current configuration:

    - learning rates, weight decay, warm-up, max_epochs: the configuration wins; the scheduler continues
      at the restored step on the schedule the configuration defines (total steps = max_epochs x epoch
      length), and every change is logged with both values;
    - the epoch length (batch size, number of cases or processes) changed: at an epoch boundary the
      counters are rescaled (``epoch x new length`` steps done) and the change logged; in the middle of an
      epoch a change of anything that decides the data order (``ORDER_KEYS``) is refused, naming it;
    - fewer ``max_epochs`` than epochs done: refused; all epochs done: logged as nothing left to do.

    Args:
        trainer: the training `Workflow` (its ``data_loader`` and state).
        optimizer: the configured optimizer (its learning rates and weight decays are read now, before any
            checkpoint overwrites them).
        lr_scheduler: the configured scheduler (``warmup_steps`` and ``t_total`` when it has them).
        network: checked before every save: a non-finite parameter refuses the save.

    Raises:
        FloatingPointError: ``state_dict()`` of a network with a non-finite parameter.
        ValueError: a resume that cannot be reconciled (see above); the message names both values.
    """

    def __init__(self, trainer: Engine, optimizer: torch.optim.Optimizer, lr_scheduler, network: torch.nn.Module):
        self.trainer = trainer
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.network = network
        self.configuration = self._configuration()
        self._loaded: dict | None = None
        self._rng_on_first_batch: dict | None = None
        trainer.add_event_handler(Events.GET_BATCH_STARTED, self._restore_rng_before_first_batch)

    @property
    def _sampler(self):
        return getattr(self.trainer.data_loader, "sampler", None)

    def _configuration(self) -> dict:
        loader, sampler = self.trainer.data_loader, self._sampler
        return {
            "max_epochs": int(self.trainer.state.max_epochs),
            "epoch_length": int(self.trainer.state.epoch_length),
            "batch_size": int(loader.batch_size),
            "cases": len(loader.dataset),
            "processes": int(getattr(sampler, "num_replicas", 1)),
            "learning_rates": [float(g.get("initial_lr", g["lr"])) for g in self.optimizer.param_groups],
            "weight_decays": [float(g.get("weight_decay", 0.0)) for g in self.optimizer.param_groups],
            "warmup_steps": int(getattr(self.lr_scheduler, "warmup_steps", 0)),
            "total_steps": int(getattr(self.lr_scheduler, "t_total", 0)),
            "sampler_seed": int(getattr(sampler, "seed", -1)),
        }

    def state_dict(self) -> dict:
        for name, param in self.network.named_parameters():
            if not torch.isfinite(param).all():
                raise FloatingPointError(
                    f"refusing to save a checkpoint: parameter {name} is not finite at iteration "
                    f"{self.trainer.state.iteration}; the previous checkpoint is left as it was"
                )
        state = self.trainer.state
        # an exception inside an iteration (a collective whose peer died) comes before its optimizer step
        iteration = int(getattr(state, "last_finished_iteration", state.iteration))
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.get_state()),
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "transforms": [_numpy_state(r.get_state()) for r in self._transform_states()],
        }
        return {
            "configuration": dict(self.configuration),
            "rng": rng,
            "data_order": {
                "iteration": iteration,
                "epoch": iteration // state.epoch_length,
                "batches_done_in_epoch": iteration % state.epoch_length,
            },
            "nonfinite_steps_skipped": int(getattr(state, "nonfinite_steps_skipped", 0)),
        }

    def _transform_states(self) -> list[np.random.RandomState]:
        return _random_states(getattr(self.trainer.data_loader.dataset, "transform", None))

    def load_state_dict(self, state_dict: Mapping) -> None:
        self._loaded = dict(state_dict)
        saved = state_dict["configuration"]
        done = state_dict["data_order"]["epoch"]
        if done > self.configuration["max_epochs"]:
            raise ValueError(
                f"the checkpoint has trained {done} epochs and max_epochs is now {self.configuration['max_epochs']} "
                f"(it was {saved['max_epochs']}): raise --max_epochs to at least {done} to resume"
            )

    def resume_completed(self, engine: Engine, path: str | Path = "the checkpoint") -> None:
        """Reconcile the loaded state with the current configuration, restore RNG and data order."""
        if self._loaded is None:
            return
        saved, now = self._loaded["configuration"], self.configuration
        state = engine.state
        state.iteration = self._loaded["data_order"]["iteration"]  # the trainer's counter may count a failed step
        changes = [f"{key} {saved[key]} -> {now[key]}" for key in now if key in saved and saved[key] != now[key]]
        done_epochs, done_batches = divmod(state.iteration, saved["epoch_length"])
        if done_batches and any(saved.get(key) != now[key] for key in ORDER_KEYS):
            raise ValueError(
                f"{path} stopped after batch {done_batches} of {saved['epoch_length']} in epoch {done_epochs + 1}, "
                f"and the data order of that epoch has changed ({'; '.join(changes)}): the rest of it is not "
                "defined under the new configuration. Resume from the last per-epoch checkpoint "
                "(--resume_checkpoint .../model_clip_checkpoint_epoch=N.pt) or restore the configuration"
            )
        if done_batches and not hasattr(self._sampler, "skip_next"):
            raise ValueError(
                f"{path} stopped in the middle of epoch {done_epochs + 1}: continuing it needs the training "
                "sampler scripts.checkpoints.ResumableSampler (train#sampler), got "
                f"{type(self._sampler).__name__}; resume from the last per-epoch checkpoint instead"
            )
        state.iteration = done_epochs * now["epoch_length"] + done_batches  # rescaled at an epoch boundary
        state.epoch = done_epochs
        state.epoch_length, state.max_epochs = now["epoch_length"], now["max_epochs"]
        state.last_finished_iteration = state.iteration
        state.nonfinite_steps_skipped = int(self._loaded.get("nonfinite_steps_skipped", 0))
        self._apply_schedule(state.iteration)
        self._restore_rng(self._loaded["rng"])
        if done_batches:
            self._sampler.skip_next(done_batches * now["batch_size"])
            self._rng_on_first_batch = self._loaded["rng"]  # undo the fresh data iterator's draws
        if changes:
            logger.warning(
                f"resume from {path} with a changed configuration: {'; '.join(changes)}. Continuing at epoch "
                f"{state.epoch} step {state.iteration} on the schedule of the current configuration "
                f"({now['total_steps']} steps, warm-up {now['warmup_steps']}; learning rates now "
                f"{[round(g['lr'], 10) for g in self.optimizer.param_groups]})"
            )
        if state.iteration >= now["max_epochs"] * now["epoch_length"]:
            logger.warning(
                f"resume from {path}: all {now['max_epochs']} epochs are already done, nothing left to do "
                "(raise --max_epochs to train further)"
            )
        self._loaded = None

    def _apply_schedule(self, step: int) -> None:
        """Learning rates, weight decays and schedule from the configuration, at ``step``."""
        now, scheduler = self.configuration, self.lr_scheduler
        for group, lr, decay in zip(self.optimizer.param_groups, now["learning_rates"], now["weight_decays"]):
            group["initial_lr"], group["weight_decay"] = lr, decay
        if scheduler is None:
            return
        scheduler.base_lrs = list(now["learning_rates"])
        if hasattr(scheduler, "t_total"):
            scheduler.t_total, scheduler.warmup_steps = now["total_steps"], now["warmup_steps"]
        scheduler.last_epoch = step - 1
        scheduler.step()  # sets every group's learning rate for ``step``

    def _restore_rng(self, rng: Mapping) -> None:
        _restore_torch_rng(rng)
        np.random.set_state(_numpy_tuple(rng["numpy"]))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        states = self._transform_states()
        if len(states) == len(rng["transforms"]):
            for r, saved in zip(states, rng["transforms"]):
                r.set_state(_numpy_tuple(saved))
        else:
            logger.warning(
                f"resume: the training transforms have {len(states)} random states and the checkpoint "
                f"{len(rng['transforms'])}: random augmentation restarts from the configured seed"
            )

    def _restore_rng_before_first_batch(self, engine: Engine) -> None:
        if self._rng_on_first_batch is not None:
            rng, self._rng_on_first_batch = self._rng_on_first_batch, None
            _restore_torch_rng(rng)


def _restore_torch_rng(rng: Mapping) -> None:
    """The torch CPU generator, and the CUDA ones when the device count matches (states load on ``map_location``)."""
    torch.set_rng_state(rng["torch"].cpu())
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
