"""Ignite handlers of the inference workflow: per-case outputs and the list of refused cases.

Per case, under ``{output_dir}/{case_id}/`` (`CaseWriter`, on ``ITERATION_COMPLETED``):

- ``embeddings.safetensors``: ``global_embedding (E,)``; ``region_embedding (R, E)`` and
  ``region_present (R,)`` bool when the model has a region head; ``local_embedding (N, E)`` with
  ``save_local``; metadata ``case_id``, ``model_sha256``, ``format``;
- ``scores.json``: per CT-RATE finding the zero-shot probability, its threshold and where the threshold
  came from (``null`` and the reason when there is none);
- ``maps/<finding>.nii.gz``: for each finding above its threshold, the finding-prompt-to-patch
  similarity when the model has a local head; otherwise one ``maps/cls_attention.nii.gz`` (CLS
  attention of the last block). Maps lie on the input CT's own grid and affine;
- ``case.json``: input files (relative to ``dataset_dir``, no DICOM patient or study fields), the input
  grid, what the model saw, regions present, ``seg_source``, model version, weights SHA-256, dtype.

``{output_dir}/refused.json`` lists every refused case with its reason (`RefusedCases`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.transforms import SpatialResample

from .. import metrics as M
from .. import visualize
from ..data.ctrate import FINDINGS
from ..evaluation import network_grid_affine
from ..zero_shot import load_prompt_embeddings, load_thresholds, save_safetensors, sha256_file

logger = logging.getLogger(__name__)

EMBEDDING_FORMAT = "ct_anatomy_clip.case_embeddings.v1"


def _relative(path: str | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return Path(path).name


def map_on_input_grid(
    patch_map: torch.Tensor,
    grid_affine: np.ndarray,
    grid_shape: Sequence[int],
    input_size: Sequence[int],
    input_affine: np.ndarray,
    input_shape: Sequence[int],
) -> np.ndarray:
    """A patch-grid map ``(Z, Y, X)`` resampled onto the input CT's own voxel grid, float32 ``input_shape``.

    The map is upsampled to the network input (`scripts.visualize.patch_map_to_grid`), placed in world
    coordinates by the affine of the padded network input (`scripts.evaluation.network_grid_affine`,
    from the crop's RAS affine and shape), and resampled with MONAI's `SpatialResample` (bilinear, zero
    outside the network input) onto ``input_affine`` / ``input_shape``, the grid the CT was stored on.
    """
    network_affine = network_grid_affine(torch.as_tensor(grid_affine), list(grid_shape), input_size)
    volume = torch.as_tensor(visualize.patch_map_to_grid(patch_map, list(input_size)[::-1]))  # (X, Y, Z)
    placed = MetaTensor(volume[None], affine=torch.as_tensor(network_affine))
    on_input = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)(
        placed, dst_affine=torch.as_tensor(input_affine, dtype=torch.float64), spatial_size=list(input_shape)
    )
    return np.asarray(on_input[0].detach().cpu().numpy(), dtype=np.float32)


class CaseWriter:
    """Write each embedded case's files (module docstring) as the engine completes its iteration.

    At ``STARTED`` it hashes the weights file and loads the prompt embeddings and thresholds
    (`scripts.zero_shot`); a missing or stale file leaves the scores ``null`` with the reason, logged once.

    Args:
        output_dir: the run's output folder.
        dataset_dir: input paths in case.json are written relative to it.
        model_file: the ``model.pt`` the network loaded.
        prompt_embeddings_file, prompt_file, thresholds_file: the zero-shot artefacts and the prompt JSON.
        input_size: network input ``(D, H, W)``.
        spacing_mm: the model's spacing ``(z, y, x)``.
        patch_size: ``(pz, py, px)``.
        region_names: the ``R`` region names.
        model_version: the bundle version (metadata.json).
        autocast_dtype: the dtype the network ran in (``None`` = float32), recorded.
        save_local: also write the patch embeddings ``(N, E)``.
        save_maps: write the maps.
    """

    def __init__(
        self,
        output_dir: str,
        dataset_dir: str,
        model_file: str,
        prompt_embeddings_file: str,
        prompt_file: str,
        thresholds_file: str,
        input_size: Sequence[int],
        spacing_mm: Sequence[float],
        patch_size: Sequence[int],
        region_names: Sequence[str],
        model_version: str,
        autocast_dtype: str | None = None,
        save_local: bool = False,
        save_maps: bool = True,
    ) -> None:
        self.output_dir, self.dataset_dir = Path(output_dir), Path(dataset_dir)
        self.model_file = Path(model_file)
        self.prompt_embeddings_file, self.prompt_file = prompt_embeddings_file, prompt_file
        self.thresholds_file = thresholds_file
        self.input_size = [int(s) for s in input_size]
        self.spacing_mm = [float(s) for s in spacing_mm]
        self.grid = [s // p for s, p in zip(self.input_size, patch_size)]
        self.region_names = list(region_names)
        self.model_version = model_version
        self.dtype = autocast_dtype or "float32"
        self.save_local, self.save_maps = save_local, save_maps

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.model_sha256 = sha256_file(self.model_file)
        self.prompts, reason = load_prompt_embeddings(self.prompt_embeddings_file, self.prompt_file, self.model_sha256)
        self.no_scores = reason
        if reason:
            logger.warning(f"zero-shot scores will be null: {reason}")
        self.thresholds, self.threshold_source = load_thresholds(self.thresholds_file, self.model_sha256)
        if self.prompts is not None and self.thresholds is None:
            logger.warning(f"zero-shot thresholds will be null: {self.threshold_source}")

    def __call__(self, engine: Engine) -> None:
        out = engine.state.output
        case = out["case"]
        if "refused" in case:
            return
        folder = self.output_dir / case["case_id"]
        (folder / "maps").mkdir(parents=True, exist_ok=True)
        features = {k: v[0].detach().cpu() for k, v in out["features"].items()}
        self._write_embeddings(folder, case, features)
        scores = self._scores(features["global_embedding"])
        (folder / "scores.json").write_text(json.dumps(scores, indent=4, allow_nan=False) + "\n")
        maps = self._write_maps(folder, case, features, out["cls_attention"][0].detach().cpu(), scores)
        record = self._case_record(case, features, maps)
        (folder / "case.json").write_text(json.dumps(record, indent=4) + "\n")
        above = [f for f, s in scores["findings"].items() if s["above_threshold"]]
        mask = "no mask: no region tokens" if record["seg_source"] == "none" else f"mask {record['seg_source']}"
        logger.info(
            f"{case['case_id']}: written to {folder} ({mask}; {len(record['regions_present'])} regions present; "
            f"{len(maps)} maps; above threshold: {above or 'none'})"
        )

    def _write_embeddings(self, folder: Path, case: dict, features: dict) -> None:
        tensors = {"global_embedding": features["global_embedding"]}
        if "region_embedding" in features:
            tensors["region_embedding"] = features["region_embedding"]
            tensors["region_present"] = features["region_present"].bool()
        if self.save_local and "local_embedding" in features:
            tensors["local_embedding"] = features["local_embedding"]
        metadata = {"format": EMBEDDING_FORMAT, "case_id": case["case_id"], "model_sha256": self.model_sha256}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_safetensors(tensors, folder / "embeddings.safetensors", metadata)

    def _scores(self, global_embedding: torch.Tensor) -> dict:
        if self.prompts is None:
            entry = {"probability": None, "threshold": None, "above_threshold": None, "reason": self.no_scores}
            return {"definition": None, "findings": {f: dict(entry) for f in FINDINGS}}
        probabilities = self.prompts.probabilities(global_embedding[None])[0].tolist()
        findings = {}
        for finding, p in zip(FINDINGS, probabilities):
            entry = {"probability": p, "threshold": None, "above_threshold": None}
            chosen = (self.thresholds or {}).get(finding)
            if chosen is None or chosen.get("threshold") is None:
                entry["threshold_source"] = None
                entry["reason"] = (
                    f"{self.threshold_source}: {chosen['reason']}"
                    if chosen and chosen.get("reason")
                    else self.threshold_source
                )
            else:
                t = float(chosen["threshold"])
                entry.update(threshold=t, rule=chosen["rule"], threshold_source=self.threshold_source)
                entry["above_threshold"] = bool(p > t if chosen["rule"] == ">" else p >= t)
            findings[finding] = entry
        definition = (
            f"softmax over the (present, absent) prompt pair of logit_scale {self.prompts.logit_scale:.4f} x cosine "
            f"similarity (scripts.metrics.zero_shot_probabilities), prompts from {self.prompts.path}"
        )
        return {"definition": definition, "findings": findings}

    def _write_maps(self, folder: Path, case: dict, features: dict, cls_attention: torch.Tensor, scores: dict) -> list:
        if not self.save_maps:
            return []
        maps = {}
        if "local_embedding" in features:
            if self.prompts is not None:
                present = M.ensemble_prompts(self.prompts.prompt_embedding)[:, 0]  # (K, E): "{finding} is present."
                for k, finding in enumerate(FINDINGS):
                    if scores["findings"][finding]["above_threshold"]:
                        maps[finding] = M.text_patch_similarity(features["local_embedding"], present[k], self.grid)
        else:
            maps["cls_attention"] = cls_attention.reshape(self.grid)
        written = []
        for name, patch_map in maps.items():
            volume = map_on_input_grid(
                patch_map, np.asarray(case["grid_affine"]), case["grid_shape"], self.input_size,
                np.asarray(case["input_affine"]), case["input_shape"],
            )  # fmt: skip
            path = folder / "maps" / f"{name.replace(' ', '_')}.nii.gz"
            nib.save(nib.Nifti1Image(volume, np.asarray(case["input_affine"], dtype=np.float64)), path)
            written.append(str(path.relative_to(folder)))
        return written

    def _case_record(self, case: dict, features: dict, maps: list) -> dict:
        present = features["region_present"].bool().tolist()
        return {
            "case_id": case["case_id"],
            "input": {
                "kind": case["input_kind"],
                "image": _relative(case["input_image"], self.dataset_dir),
                "seg": _relative(case.get("input_mask"), self.dataset_dir),
                **({"dicom_series": case["dicom"]} if case.get("dicom") else {}),
            },
            "input_grid": {
                "shape": case["input_shape"],
                "spacing_mm": case["input_spacing_mm"],
                "orientation": case["input_orientation"],
            },
            "model_input": {
                "spacing_mm_zyx": self.spacing_mm,
                "input_size_dhw": self.input_size,
                "orientation": "RAS",
                "centre_crop": case.get("centre_crop"),
            },
            "seg_source": case.get("mask_source", "given" if case.get("input_mask") else "none"),
            "regions_present": [name for name, p in zip(self.region_names, present) if p],
            "model": {"version": self.model_version, "weights": self.model_file.name, "sha256": self.model_sha256},
            "dtype": self.dtype,
            "outputs": {"embeddings": "embeddings.safetensors", "scores": "scores.json", "maps": maps},
        }


class RefusedCases:
    """List every refused case with its reason in ``{output_dir}/refused.json`` (rewritten as cases come).

    The file is written at the start (empty list) and after each refusal, so it is complete even if the
    run stops later; the end of the run logs how many cases were written and refused, and puts both counts in
    ``engine.state.metrics`` (``cases_written``, ``cases_refused``: what ``--tracking mlflow`` logs).
    """

    def __init__(self, output_dir: str, dataset_dir: str) -> None:
        self.path = Path(output_dir) / "refused.json"
        self.dataset_dir = Path(dataset_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._count)  # before trackers log the epoch's metrics
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _start(self, engine: Engine) -> None:
        self.refused, self.done = [], 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()

    def __call__(self, engine: Engine) -> None:
        case = engine.state.output["case"]
        self.done += 1
        if "refused" not in case:
            return
        self.refused.append(
            {"case_id": case["case_id"], "image": _relative(case.get("input_image"), self.dataset_dir),
             "reason": case["refused"]}
        )  # fmt: skip
        logger.warning(f"{case['case_id']}: refused: {case['refused']}")
        self._write()

    def _count(self, engine: Engine) -> None:
        engine.state.metrics.update(cases_written=self.done - len(self.refused), cases_refused=len(self.refused))

    def _finish(self, engine: Engine) -> None:
        logger.info(
            f"inference: {self.done - len(self.refused)} of {self.done} cases written to {self.path.parent}, "
            f"{len(self.refused)} refused (listed in {self.path})"
        )

    def _write(self) -> None:
        self.path.write_text(json.dumps(self.refused, indent=4) + "\n")
