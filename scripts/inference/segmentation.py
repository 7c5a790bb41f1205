"""``seg_source totalsegmentator``: make the missing TotalSegmentator v2 ``total`` mask of a case at inference.

TotalSegmentator (Wasserthal et al., Radiology: AI 2023; https://github.com/wasserth/TotalSegmentator,
Apache-2.0) is an optional dependency: it is not installed with the bundle and its weights are
downloaded by its own command. This module only calls its Python API
(``totalsegmentator.python_api.totalsegmentator``, version 2.x, task ``total``, one multi-label map)
on the CT exactly as the bundle loaded it, so the mask lies on the CT's grid.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import LoadImage, MapTransform

logger = logging.getLogger(__name__)

SEG_SOURCES = ("none", "totalsegmentator")
TOTAL_TASK_WEIGHTS = "Dataset291_*"  # first of the five `total` task models (ids 291-295)
INSTALL_HELP = (
    "seg_source 'totalsegmentator' runs TotalSegmentator 2.x (task 'total') on CTs without a mask. Install it "
    "and its weights once (needs network access): pip install 'TotalSegmentator>=2.4,<3' && "
    "totalseg_download_weights -t total. Or give masks (datalist 'seg' or seg_dir/<case_id>.nii.gz), or run "
    "with --seg_source none (no region tokens)."
)


def check_seg_source(seg_source: str) -> str:
    """Check ``seg_source`` before any case is read; for ``totalsegmentator``, that it can run offline.

    Raises:
        ValueError: an unknown ``seg_source``.
        RuntimeError: TotalSegmentator or its ``total`` weights are not installed (says how to install).
    """
    if seg_source not in SEG_SOURCES:
        raise ValueError(f"seg_source must be one of {SEG_SOURCES}, got {seg_source!r}")
    if seg_source == "totalsegmentator":
        try:
            from totalsegmentator.config import get_weights_dir
            from totalsegmentator.python_api import totalsegmentator  # noqa: F401
        except ImportError as err:
            raise RuntimeError(f"TotalSegmentator is not installed ({err}). {INSTALL_HELP}") from err
        weights = Path(get_weights_dir())
        if not any(weights.glob(TOTAL_TASK_WEIGHTS)):
            raise RuntimeError(f"TotalSegmentator's 'total' weights are not in {weights}. {INSTALL_HELP}")
    return seg_source


class TotalSegmentatord(MapTransform):
    """Give a case without a mask the TotalSegmentator ``total`` label map of its CT (``seg_source``).

    With ``seg_source="none"`` nothing happens (the case runs without region tokens). With
    ``"totalsegmentator"`` the CT (a NIfTI file or a DICOM folder, read as the preprocessing reads it)
    is segmented and the mask written to ``{output_dir}/{case_id}/totalsegmentator_total.nii.gz``; the
    item's ``seg`` then points at it. Every item gets ``mask_source``: ``"given"``, ``"totalsegmentator"``
    or ``"none"``.

    Args:
        seg_source: ``"none"`` or ``"totalsegmentator"`` (checked by `check_seg_source`).
        output_dir: the inference output folder.
        device: where TotalSegmentator runs.
    """

    def __init__(self, seg_source: str, output_dir: str, device: torch.device | str = "cpu") -> None:
        super().__init__(keys="image")
        self.seg_source = check_seg_source(seg_source)
        self.output_dir = Path(output_dir)
        self.device = "gpu" if torch.device(device).type == "cuda" else "cpu"

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if d.get("seg") is not None:
            d["mask_source"] = "given"
            return d
        d["mask_source"] = self.seg_source
        if self.seg_source == "none":
            return d
        from totalsegmentator.python_api import totalsegmentator

        ct = LoadImage(image_only=True)(d["image"])  # (X, Y, Z) with its RAS affine, as the preprocessing reads it
        ct_image = nib.Nifti1Image(ct.numpy().astype(np.float32), np.asarray(ct.affine, dtype=np.float64))
        path = self.output_dir / d["case_id"] / "totalsegmentator_total.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info(f"{d['case_id']}: running TotalSegmentator (task total) on {d['image']}")
        mask = totalsegmentator(ct_image, None, ml=True, task="total", quiet=True, device=self.device)
        # TotalSegmentator's own header, label table extension included, so the label check can verify the ids
        saved = nib.Nifti1Image(np.asarray(mask.dataobj).astype(np.uint8), mask.affine, mask.header)
        saved.set_data_dtype(np.uint8)
        nib.save(saved, path)
        d["seg"] = d["input_mask"] = str(path)
        return d
