"""Zero-shot scoring without a text model: the prompt-embedding file and the thresholds file.

``models/prompt_embeddings.safetensors`` holds the trained text tower's embeddings of the zero-shot
prompts (`scripts.metrics.prompt_embeddings`) and the model's logit scale, made from the same checkpoint
as ``models/model.pt``; inference scores a CT with `scripts.metrics.zero_shot_probabilities` from them,
exactly as the evaluation does with the live text tower. Tensors:

- ``prompt_embedding``: float32 ``(K, 2, T, E)`` = (finding, present/absent, template, width), the
  text tower's L2-normalised projected embeddings, before template ensembling;
- ``logit_scale``: float32 ``()``, the CLIP model's clamped ``exp(log_logit_scale)``.

Metadata (all strings): ``format`` (`PROMPT_FORMAT`), ``findings`` and ``templates`` (JSON lists),
``prompt_file_sha256`` (of the prompt JSON), ``model_sha256`` (of ``model.pt`` when the file was made),
``model_file`` (``"model.pt"``). A changed prompt file or other weights are detected by comparing the two
hashes. ``models/thresholds.json`` holds the evaluation's per-finding thresholds for the same
``model_sha256`` (`ThresholdWriter`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from safetensors import safe_open
from safetensors.torch import save_file

from . import metrics as M
from .checkpoints import load_checkpoint
from .data.ctrate import FINDINGS
from .run_record import write_atomically

logger = logging.getLogger(__name__)

PROMPT_FORMAT = "ct_anatomy_clip.prompt_embeddings.v1"
PROMPT_EMBEDDINGS_FILE = "prompt_embeddings.safetensors"
THRESHOLDS_FILE = "thresholds.json"
MODEL_FILE = "model.pt"
REMAKE_COMMAND = (
    "python -m monai.bundle run --config_file \"['configs/train.json',<the overrides it was trained with>,"
    "'configs/prompt_embeddings.json']\""
)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, then the permissions of any file this user creates (``0o666 & ~umask``).

    safetensors 0.8 creates its files readable by their owner only (0600), unlike every other output of the
    bundle; a service reading embeddings under another account would be refused.
    """
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def compute_prompt_embeddings(clip_model: torch.nn.Module, templates: Sequence[Sequence[str]]) -> torch.Tensor:
    """The text tower's prompt embeddings ``(K, 2, T, E)`` float32 on the CPU, in eval mode without gradients."""
    training = clip_model.training
    clip_model.eval()
    try:
        with torch.no_grad():
            return M.prompt_embeddings(
                lambda t: clip_model.text_encoder(t).float().cpu(), FINDINGS, [tuple(t) for t in templates]
            )
    finally:
        clip_model.train(training)


def save_prompt_embeddings(
    clip_model: torch.nn.Module, templates: Sequence[Sequence[str]], prompt_file: str | Path, model_file: str | Path
) -> Path:
    """Write ``prompt_embeddings.safetensors`` beside ``model_file`` for the weights now in ``clip_model``.

    The caller guarantees that ``clip_model``'s image encoder is what ``model_file`` holds (the training
    handler runs right after ``model.pt`` is saved; `write_prompt_embeddings_for_checkpoint` compares).
    """
    model_file = Path(model_file)
    prompt_embedding = compute_prompt_embeddings(clip_model, templates)
    tensors = {
        "prompt_embedding": prompt_embedding.contiguous(),
        "logit_scale": clip_model.logit_scale().detach().float().cpu().reshape(()),
    }
    metadata = {
        "format": PROMPT_FORMAT,
        "findings": json.dumps(list(FINDINGS)),
        "templates": json.dumps([list(t) for t in templates]),
        "prompt_file_sha256": sha256_file(prompt_file),
        "model_sha256": sha256_file(model_file),
        "model_file": model_file.name,
    }
    path = model_file.parent / PROMPT_EMBEDDINGS_FILE
    write_atomically(path, lambda tmp: save_safetensors(tensors, tmp, metadata))
    logger.info(f"{path}: zero-shot prompt embeddings {tuple(prompt_embedding.shape)} for {model_file}")
    return path


@dataclass(frozen=True)
class PromptEmbeddings:
    """A checked prompt-embedding file: ``prompt_embedding (K, 2, T, E)``, ``logit_scale``, names, hashes."""

    prompt_embedding: torch.Tensor
    logit_scale: float
    findings: tuple[str, ...]
    templates: tuple[tuple[str, str], ...]
    model_sha256: str
    path: str

    def probabilities(self, image_embedding: torch.Tensor) -> torch.Tensor:
        """``(M, E)`` image embeddings -> ``(M, K)`` probabilities (`scripts.metrics.zero_shot_probabilities`)."""
        return M.zero_shot_probabilities(image_embedding, self.prompt_embedding, self.logit_scale)


def load_prompt_embeddings(
    path: str | Path, prompt_file: str | Path, model_sha256: str
) -> tuple[PromptEmbeddings | None, str | None]:
    """Read ``prompt_embeddings.safetensors`` and check it against the prompt file and the weights in use.

    Returns:
        ``(PromptEmbeddings, None)``, or ``(None, reason)`` when the file is missing, is not this
        bundle's format, was made from another prompt file or for other weights (``model_sha256``, the
        SHA-256 of the ``model.pt`` inference loads); the reason says how to remake it.
    """
    path = Path(path)
    if not path.is_file():
        return None, f"no {path}: training writes it with model.pt; for an existing checkpoint run {REMAKE_COMMAND}"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != PROMPT_FORMAT:
            return None, f"{path}: format {meta.get('format')!r}, expected {PROMPT_FORMAT!r}"
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    prompt_sha = sha256_file(prompt_file)
    if meta.get("prompt_file_sha256") != prompt_sha:
        return None, (
            f"{prompt_file} changed since {path} was made (sha256 {prompt_sha[:12]}... now, "
            f"{str(meta.get('prompt_file_sha256'))[:12]}... then); remake it: {REMAKE_COMMAND}"
        )
    if meta.get("model_sha256") != model_sha256:
        return None, (
            f"{path} was made for other weights (model.pt sha256 {str(meta.get('model_sha256'))[:12]}...), not the "
            f"model.pt in use ({model_sha256[:12]}...); remake it: {REMAKE_COMMAND}"
        )
    findings = tuple(json.loads(meta["findings"]))
    if findings != tuple(FINDINGS):
        return None, f"{path}: findings {findings} differ from this bundle's {tuple(FINDINGS)}"
    prompts = PromptEmbeddings(
        prompt_embedding=tensors["prompt_embedding"].float(),
        logit_scale=float(tensors["logit_scale"]),
        findings=findings,
        templates=tuple(tuple(t) for t in json.loads(meta["templates"])),
        model_sha256=model_sha256,
        path=str(path),
    )
    return prompts, None


class PromptEmbeddingWriter:
    """Training handler on the validator: remake the prompt embeddings whenever ``model.pt`` was replaced.

    Attach it to the validator after the key-metric `CheckpointSaver` that writes ``model.pt``: at the end
    of each validation, if ``model.pt`` was written since the handler was attached (its size or time
    stamp changed), the text tower in memory is the one of that best epoch and the file is rewritten for
    it. A ``model.pt`` left from before (a resume keeps the best of the first run) is not touched.

    Args:
        clip_model: the `CTReportCLIP` being trained (not DDP-wrapped).
        templates: the zero-shot ``(present, absent)`` prompt pairs.
        prompt_file: the JSON they came from (its hash goes into the file).
        ckpt_dir: where ``model.pt`` is.
    """

    def __init__(
        self, clip_model: torch.nn.Module, templates: Sequence[Sequence[str]], prompt_file: str, ckpt_dir: str
    ) -> None:
        self.clip_model, self.templates, self.prompt_file = clip_model, templates, prompt_file
        self.model_file = Path(ckpt_dir) / MODEL_FILE
        self._seen = None

    def _stamp(self) -> tuple[int, int] | None:
        if not self.model_file.is_file():
            return None
        stat = self.model_file.stat()
        return stat.st_size, stat.st_mtime_ns

    def attach(self, engine: Engine) -> None:
        self._seen = self._stamp()
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        stamp = self._stamp()
        if stamp is not None and stamp != self._seen:
            save_prompt_embeddings(self.clip_model, self.templates, self.prompt_file, self.model_file)
            self._seen = stamp


def _same_weights(module: torch.nn.Module, state_dict: dict) -> bool:
    own = module.state_dict()
    return own.keys() == state_dict.keys() and all(torch.equal(own[k].cpu(), state_dict[k].cpu()) for k in own)


def write_prompt_embeddings_for_checkpoint(
    clip_model: torch.nn.Module,
    checkpoint: str | Path,
    ckpt_dir: str | Path,
    prompt_file: str | Path,
    templates: Sequence[Sequence[str]],
) -> Path:
    """The one-command step for an existing checkpoint (``configs/prompt_embeddings.json``).

    Loads ``checkpoint`` (both towers, e.g. ``model_clip_best.pt``, with ``weights_only=True``) into
    ``clip_model``, checks that its image encoder is exactly ``{ckpt_dir}/model.pt``, and writes
    ``prompt_embeddings.safetensors`` beside it.

    Raises:
        FileNotFoundError: ``checkpoint`` or ``model.pt`` is missing.
        ValueError: the two files hold different image-encoder weights (not one checkpoint).
    """
    model_file = Path(ckpt_dir) / MODEL_FILE
    for path in (Path(checkpoint), model_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
    state = load_checkpoint(checkpoint, map_location="cpu")
    clip_model.load_state_dict(state.get("model", state), strict=True)
    if not _same_weights(clip_model.image_encoder, load_checkpoint(model_file, map_location="cpu")):
        raise ValueError(
            f"the image encoder in {checkpoint} differs from {model_file}: they are not from one checkpoint, so "
            "its text tower cannot stand for model.pt (name the matching file with --prompt_checkpoint)"
        )
    return save_prompt_embeddings(clip_model, templates, prompt_file, model_file)


class ThresholdWriter:
    """Evaluation handler: write ``models/thresholds.json`` from the report, when ``model.pt`` was evaluated.

    At the end of the evaluation (after `scripts.evaluation.EvaluationReport`, which leaves the report in
    ``engine.state.evaluation_report``) the zero-shot thresholds of each finding are written
    with the SHA-256 of ``model.pt``, but only when the evaluated image encoder holds exactly the weights
    of ``model.pt`` (evaluating ``model_clip.pt``, the last epoch, writes nothing and says so).

    Args:
        clip_model: the evaluated `CTReportCLIP`.
        ckpt_dir: where ``model.pt`` is and ``thresholds.json`` goes.
        eval_section: the datalist section evaluated (recorded).
    """

    def __init__(self, clip_model: torch.nn.Module, ckpt_dir: str, eval_section: str) -> None:
        self.clip_model, self.eval_section = clip_model, eval_section
        self.model_file = Path(ckpt_dir) / MODEL_FILE

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        report = getattr(engine.state, "evaluation_report", None)
        if report is None:
            return  # not rank 0
        if not self.model_file.is_file() or not _same_weights(
            self.clip_model.image_encoder, load_checkpoint(self.model_file, map_location="cpu")
        ):
            logger.warning(f"thresholds not written: the evaluated image encoder is not {self.model_file}")
            return
        zero_shot = report["zero_shot"]
        findings = {}
        for finding, row in zero_shot["per_class"].items():
            threshold = row["threshold"]
            findings[finding] = {
                "threshold": threshold.get("value"),
                "rule": threshold.get("rule"),
                **({"reason": threshold["reason"]} if threshold.get("value") is None else {}),
                "n": row["n"],
                "n_positive": row["n_positive"],
            }
        record = {
            "model_sha256": sha256_file(self.model_file),
            "threshold_method": zero_shot["protocol"]["threshold_method"],
            "eval_section": self.eval_section,
            "cases": report["cases"],
            "findings": findings,
        }
        path = self.model_file.parent / THRESHOLDS_FILE
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=4, allow_nan=False) + "\n"))
        logger.info(f"{path}: zero-shot thresholds ({record['threshold_method']}) for {self.model_file}")


def load_thresholds(path: str | Path, model_sha256: str) -> tuple[dict | None, str]:
    """``({finding: entry}, source)`` from ``thresholds.json`` for the weights in use, or ``(None, reason)``."""
    path = Path(path)
    if not path.is_file():
        return None, f"no {path}: run the evaluation of this model to choose thresholds (probabilities only)"
    record = json.loads(path.read_text())
    if record.get("model_sha256") != model_sha256:
        return None, f"{path} was chosen for other weights (model.pt sha256 {str(record.get('model_sha256'))[:12]}...)"
    source = f"{path} ({record['threshold_method']} rule on {record['cases']} {record['eval_section']} cases)"
    return record["findings"], source
