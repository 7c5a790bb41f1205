"""Bundle steps that the inference workflow runs around the stock-MONAI ``preprocessing`` of inference.json.

They record what the outputs need (the input CT's own grid, for maps; what was cropped, for case.json)
and log what the model does to a case; none changes the image.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

logger = logging.getLogger(__name__)


class RecordInputGridd(MapTransform):
    """Keep the loaded CT's own grid, before any reorientation: the grid the output maps are written on.

    Run right after loading (channel first). Writes ``input_affine`` ``(4, 4)`` float64 (RAS, as MONAI's
    readers give it, for NIfTI the file's affine), ``input_shape`` (3 ints, the stored voxel order),
    ``input_spacing_mm`` and ``input_orientation`` (axis codes such as ``"LPS"``).
    """

    def __init__(self, keys: KeysCollection = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        image = d[self.keys[0]]
        affine = np.asarray(image.affine, dtype=np.float64)
        d["input_affine"] = affine
        d["input_shape"] = [int(s) for s in image.shape[1:]]
        d["input_spacing_mm"] = [round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0)]
        d["input_orientation"] = "".join(nib.aff2axcodes(affine))
        return d


class CentreCropNoticed(MapTransform):
    """Say when a resampled CT is larger than the model input, so the centre crop that follows is never silent.

    The model's rule for a volume larger than ``input_size``: the centred ``input_size`` box is kept (the
    same crop as validation and evaluation), the rest is not seen. Run after resampling, on RAS arrays
    ``(C, X, Y, Z)``. Logs one line per such case (with the extent in mm) and writes ``centre_crop``:
    ``None`` or ``{"resampled_voxels", "kept_voxels"}`` (x, y, z) for case.json.

    Args:
        keys: the image key.
        input_size: the model input ``(D, H, W)`` = (z, y, x).
        spacing_mm: the resampled spacing ``(z, y, x)``.
    """

    def __init__(self, keys: KeysCollection, input_size: Sequence[int], spacing_mm: Sequence[float]) -> None:
        super().__init__(keys)
        self.roi_xyz = [int(s) for s in input_size][::-1]
        self.spacing_xyz = [float(s) for s in spacing_mm][::-1]

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        shape = [int(s) for s in d[self.keys[0]].shape[1:]]
        d["centre_crop"] = None
        if any(s > r for s, r in zip(shape, self.roi_xyz)):
            kept = [min(s, r) for s, r in zip(shape, self.roi_xyz)]
            mm = [round(s * p, 1) for s, p in zip(shape, self.spacing_xyz)]
            kept_mm = [round(s * p, 1) for s, p in zip(kept, self.spacing_xyz)]
            logger.info(
                f"{d.get('case_id', d.get('input_image'))}: {mm} mm (x, y, z) is larger than the model input; the "
                f"centre {kept_mm} mm is kept (input_size {self.roi_xyz[::-1]} (D, H, W) voxels)"
            )
            d["centre_crop"] = {"resampled_voxels": shape, "kept_voxels": kept}
        return d
