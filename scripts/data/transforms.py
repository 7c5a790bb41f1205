"""Bundle-specific MONAI transforms; everything else in the chains is stock MONAI (see configs/train.json)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transposed


def _source_name(img: torch.Tensor) -> str:
    """The file a MetaTensor was loaded from, or a placeholder."""
    meta = getattr(img, "meta", {})
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class CheckSameGridd(MapTransform):
    """Refuse a case whose label map does not lie on the image's world grid.

    Run it after `Orientationd` (both arrays in RAS): the spatial shapes must be equal and the affines
    equal within ``atol_mm``. A mask exported on another grid (resampled, cropped, flipped) would
    silently mislabel every patch, so it is an error, not a resampling.

    Args:
        keys: ``(image_key, label_key)``, both `MetaTensor` with an ``affine``.
        atol_mm: tolerance on every affine entry, in mm (1e-3 by default).

    Raises:
        ValueError: shapes or affines differ; the message names both files and both grids.
    """

    def __init__(self, keys: KeysCollection, atol_mm: float = 1e-3) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"CheckSameGridd takes (image_key, label_key), got {self.keys}")
        self.atol_mm = atol_mm

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image, label = (d[k] for k in self.keys)
        if not isinstance(image, MetaTensor) or not isinstance(label, MetaTensor):
            raise ValueError(f"CheckSameGridd needs MetaTensors with affines for {self.keys}")
        image_affine = np.asarray(image.affine, dtype=np.float64)
        label_affine = np.asarray(label.affine, dtype=np.float64)
        if image.shape[1:] != label.shape[1:] or not np.allclose(image_affine, label_affine, rtol=0, atol=self.atol_mm):
            raise ValueError(
                f"{_source_name(label)}: label grid {tuple(label.shape[1:])} with affine "
                f"{np.round(label_affine, 3).tolist()} differs from image {_source_name(image)} grid "
                f"{tuple(image.shape[1:])} with affine {np.round(image_affine, 3).tolist()} (compared in RAS)"
            )
        return d


class ToSliceFirstd(Transposed):
    """Permute RAS arrays ``(C, X, Y, Z)`` to the network's ``(C, Z, Y, X)`` = ``(C, D, H, W)``.

    The one place where MONAI's axis order (slices last, after `Orientationd("RAS")`) becomes the
    encoder's (slices first, superior at the highest ``D`` index). The affine is not rewritten: arrays
    past this point feed the network only.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, indices=(0, 3, 2, 1), allow_missing_keys=allow_missing_keys)

