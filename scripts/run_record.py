"""``models/train_config.json``: what a checkpoint folder was trained with, and the checks made against it.

Training writes the record before its first iteration (`claim_ckpt_dir`); evaluation, the prompt-embedding
step and inference compare their own configuration with it (`check_checkpoint_config`). The record:

- ``weights``: the settings that define what the weights are and what input they expect, **the only part
  compared**: ``network_def``'s architecture and heads (``embed_dim``, ``depth``, ``num_heads``,
  ``patch_size``, ``input_size``, ``projection_dim``, ``projection_heads``, ``block_type``,
  ``pos_embed_type``, ``segmentation_head``, ``finding_head``, ``region_class_ids``) and the input
  geometry (``spacing_mm``, ``hu_window``);
- ``text_tower``: the text encoder's architecture (its `transformers` config without paths or versions),
  pooling and projection width; compared by training and evaluation, not by inference (it has no text
  tower);
- ``settings``: the rest of the resolved run (objective weights, schedule, data, precision, attention
  path), kept for the record and to name the overrides in a refusal, never compared: a resume with
  another schedule, batch size or learning rate is not refused here.

Runtime switches (``attention_impl``, ``gradient_checkpointing``, ``autocast_dtype``, ``num_workers``)
do not change the weights and are in ``settings`` only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

RECORD_FILE = "train_config.json"
CHECKPOINT_GLOBS = ("*.pt", "*.ts", "*.safetensors", "thresholds.json")
OBJECTIVE_KEYS = ("global_weight", "region_weight", "step_weight", "local_weight", "segmentation_weight",
                  "finding_weight")  # fmt: skip


def _plain(value):
    """A JSON-comparable copy (tuples become lists, torch sizes and numbers plain)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def text_tower_identity(text_encoder: torch.nn.Module) -> dict:
    """The text encoder's architecture as a plain dict: its `transformers` config (without ``_name_or_path``,
    versions or dtype), ``pooling`` and projection width; a local path and a hub id of one model agree."""
    config = {
        k: v
        for k, v in text_encoder.model.config.to_dict().items()
        if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype", "architectures")
    }
    return _plain(
        {"config": config, "pooling": text_encoder.pooling, "projection_dim": text_encoder.projection.out_features}
    )


def load_record(ckpt_dir: str | Path) -> dict | None:
    path = Path(ckpt_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _differences(recorded: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: trained {json.dumps(old)}, this run {json.dumps(new)}")
    return lines


def _heads(weights: Mapping) -> set[str]:
    heads = set(weights.get("projection_heads") or [])
    heads |= {name for name in ("segmentation_head", "finding_head") if weights.get(name)}
    return {h.replace("_head", "") for h in heads}


def compare(
    record: Mapping, weights: Mapping, text_tower: Mapping | None = None, objectives: Mapping | None = None
) -> str | None:
    """``None`` when the configuration matches the record, else the explanation (what differs, which heads
    the checkpoint has that this configuration would not build, and the objective overrides that built them)."""
    current = {"weights": _plain(weights)}
    recorded = {"weights": record.get("weights", {})}
    if text_tower is not None:
        current["text_tower"] = _plain(text_tower)
        recorded["text_tower"] = record.get("text_tower", {})
    lines = _differences(recorded, current)
    if not lines:
        return None
    text = "\n  ".join(lines)
    missing = sorted(_heads(recorded["weights"]) - _heads(current["weights"]))
    if missing:
        trained = record.get("settings", {})
        overrides = [
            f"{k}={trained[k]}" for k in OBJECTIVE_KEYS if k in trained and (objectives or {}).get(k) != trained[k]
        ]
        text += (
            f"\n  The checkpoint has heads this configuration does not build: {', '.join(missing)}. It was trained with "
            f"{', '.join(overrides) or 'other objective weights'}: add the override file that sets them (e.g. "
            "configs/ablation.json) to --config_file."
        )
    return text


def check_checkpoint_config(
    ckpt_dir: str | Path,
    weights: Mapping,
    role: str,
    text_tower: Mapping | None = None,
    objectives: Mapping | None = None,
) -> None:
    """Refuse to use the checkpoints of ``ckpt_dir`` with a configuration other than their training's.

    Args:
        ckpt_dir: the folder of ``model.pt`` and ``train_config.json``.
        weights: this run's ``weights_config`` (module docstring).
        role: what is about to use the checkpoint (``"evaluation"``, ``"inference"``), for the messages.
        text_tower: this run's `text_tower_identity`, when it uses the text tower.
        objectives: this run's objective weights, to name the overrides in the message.

    Raises:
        ValueError: the configuration differs from the record; the message lists every difference and,
            for heads that would be missing, the overrides the checkpoint was trained with.
    """
    record = load_record(ckpt_dir)
    if record is None:
        logger.warning(
            f"{Path(ckpt_dir) / RECORD_FILE} not found: cannot check that this {role} configuration is the one the "
            "checkpoint was trained with (weights from elsewhere?); a strict state-dict load still checks shapes"
        )
        return
    problem = compare(record, weights, text_tower, objectives)
    if problem:
        raise ValueError(
            f"{role} refused: the checkpoints in {ckpt_dir} were trained with another configuration "
            f"({Path(ckpt_dir) / RECORD_FILE}):\n  {problem}"
        )


def _checkpoint_files(ckpt_dir: Path) -> list[str]:
    return sorted({p.name for pattern in CHECKPOINT_GLOBS for p in ckpt_dir.glob(pattern) if p.is_file()})


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp_path)``, then rename over ``path``: a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def claim_ckpt_dir(ckpt_dir: str | Path, record: Mapping, write: bool = True) -> None:
    """Before training starts: stop rather than overwrite checkpoints of another configuration, then record this one.

    ``ckpt_dir`` may be new or empty, or hold checkpoints whose ``train_config.json`` has the same
    ``weights`` and ``text_tower`` (the same model, e.g. a rerun or a resume with a longer schedule). Files
    without a record (released or older weights) and files of another configuration stop the run before
    anything is written; the message names both configurations and a ``--ckpt_dir`` to use instead.
    ``models/model.pt`` stays the default place (MONAI Label, the Model Zoo CI and ``ckpt_export`` read it).

    Args:
        ckpt_dir: the training's checkpoint folder.
        record: ``{"weights", "text_tower", "settings"}`` of this run (train.json ``train_record``).
        write: write ``train_config.json`` (rank 0 only under DDP).

    Raises:
        FileExistsError: checkpoints of another (or an unknown) configuration are in ``ckpt_dir``.
    """
    ckpt_dir = Path(ckpt_dir)
    record = _plain(dict(record))
    files = _checkpoint_files(ckpt_dir) if ckpt_dir.is_dir() else []
    digest = hashlib.sha256(json.dumps([record["weights"], record["text_tower"]], sort_keys=True).encode()).hexdigest()
    elsewhere = ckpt_dir / f"run-{digest[:8]}"
    if files:
        existing = load_record(ckpt_dir)
        if existing is None:
            raise FileExistsError(
                f"{ckpt_dir} holds {', '.join(files)} without a {RECORD_FILE}: what they were trained with is unknown "
                f"(released or older weights?) and this training would overwrite them. Train into another folder, "
                f"e.g. --ckpt_dir {elsewhere}, or move those files away."
            )
        problem = compare(existing, record["weights"], record["text_tower"], record.get("settings"))
        if problem:
            raise FileExistsError(
                f"{ckpt_dir} holds {', '.join(files)} trained with another configuration; this training would "
                f"overwrite them. Differences (trained = {ckpt_dir / RECORD_FILE}, this run = your config files and "
                f"overrides):\n  {problem}\nTrain into another folder, e.g. --ckpt_dir {elsewhere}, or move those files away."
            )
    if write:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        path = ckpt_dir / RECORD_FILE
        content = dict(record, written=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(content, indent=4) + "\n"))
