"""Resume helpers: which checkpoint to continue from, and the validation state that travels with it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ignite.engine import Engine

RESUME_FILE = "model_clip.pt"
EPOCH_FILES = "model_clip_checkpoint_epoch=*.pt"


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
