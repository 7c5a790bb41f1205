"""Bundle-specific MONAI transforms; everything else in the chains is stock MONAI (see configs/train.json).

Checks that refuse a case raise `BadCaseError` with the file name; the training datasets can skip such
cases with a warning instead of stopping a long run (`scripts.data.datasets`).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange, Transposed

from ..flags import require_bool
from .lexicon import RegionLexicon
from .reports import split_cot_steps, split_sentences

logger = logging.getLogger(__name__)


class BadCaseError(ValueError):
    """A case that must not be trained on (wrong grid, wrong HU scale, too few slices); names the file."""


def source_name(img: torch.Tensor) -> str:
    """The file a MetaTensor was loaded from, or a placeholder."""
    meta = getattr(img, "meta", {})
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class CheckSameGridd(MapTransform):
    """Refuse a case whose label map does not lie on the image's world grid, or that is not one volume each.

    Run it after `Orientationd` (both arrays in RAS): one channel each (a 4-D NIfTI with several volumes
    loads as several channels), the spatial shapes equal and the affines equal within ``atol_mm``. A
    mask exported on another grid (resampled, cropped, flipped) would silently mislabel every patch, so
    it is an error, not a resampling.

    Args:
        keys: ``(image_key, label_key)``, both `MetaTensor` with an ``affine``.
        atol_mm: tolerance on every affine entry, in mm (1e-3 by default).

    Raises:
        BadCaseError: more than one channel (names the file); shapes or affines differ (names both files
            and both grids).
        ValueError: the inputs are not MetaTensors.
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
        for arr in (image, label):
            if arr.shape[0] != 1:
                raise BadCaseError(
                    f"{source_name(arr)}: {arr.shape[0]} channels after loading (a 4-D or multi-component "
                    "file?); expected one 3-D volume"
                )
        image_affine = np.asarray(image.affine, dtype=np.float64)
        label_affine = np.asarray(label.affine, dtype=np.float64)
        if image.shape[1:] != label.shape[1:] or not np.allclose(image_affine, label_affine, rtol=0, atol=self.atol_mm):
            raise BadCaseError(
                f"{source_name(label)}: label grid {tuple(label.shape[1:])} with affine "
                f"{np.round(label_affine, 3).tolist()} differs from image {source_name(image)} grid "
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


class WindowPackedCT:
    """HU window of the CT channel of a packed network input, run where the tensor lies (the GPU in training).

    `pack_transforms` in ``train.json`` leaves the packed input as integers: channel 0 the CT in HU,
    channel 1 the TotalSegmentator label ids, int16. A data worker then moves 2 bytes per voxel instead
    of 4 and does no float work on the 2 x 64 x 512 x 512 seed input; the engines call this on the
    device batch (``image_transform`` of `scripts.engines.ContrastiveTrainer`). The window is MONAI's
    `ScaleIntensityRange`: HU clipped to ``hu_window`` and mapped linearly to [-1, 1].

    Args:
        hu_window: ``(lower, upper)`` in HU, lower < upper.

    Call: ``image (2, D, H, W)`` or ``(B, 2, D, H, W)``, integer HU and label ids -> float32 of the same
    shape (channel 0 windowed CT, channel 1 label ids as float), the network's input (DESIGN.md section 3).

    Raises:
        ValueError: a window with lower >= upper; an input without 2 channels at dim -4; a floating-point
            input (windowed twice would squash the CT to about 0: pack with ``pack_transforms``).
    """

    def __init__(self, hu_window: Sequence[float]) -> None:
        lower, upper = (float(v) for v in hu_window)
        if not lower < upper:
            raise ValueError(f"hu_window must be (lower, upper) in HU with lower < upper, got {list(hu_window)}")
        self.scale = ScaleIntensityRange(
            a_min=lower, a_max=upper, b_min=-1.0, b_max=1.0, clip=True, dtype=torch.float32
        )

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim not in (4, 5) or image.shape[-4] != 2:
            raise ValueError(f"expected a packed input (2, D, H, W) or (B, 2, D, H, W), got {tuple(image.shape)}")
        if image.is_floating_point():
            raise ValueError(
                f"expected integer HU and label ids from pack_transforms, got {image.dtype}: "
                "is the input windowed already?"
            )
        ct, label_map = image.narrow(-4, 0, 1), image.narrow(-4, 1, 1)
        return torch.cat([self.scale(ct), label_map.float()], dim=-4)


class FillMissingLabelMapd(MapTransform):
    """Give a case without a label map an empty one (all background) on the image's grid.

    Used when the configuration accepts CTs without TotalSegmentator masks: such a case gets no region
    tokens (the encoder's region presence is all false) instead of stopping the run.

    Args:
        keys: ``(image_key, label_key)``.
    """

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys)
        self.image_key, self.label_key = self.keys

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if d.get(self.label_key) is None:
            image = d[self.image_key]
            meta = dict(image.meta, no_label_map=True)  # no label table to check, no header to compare
            d[self.label_key] = MetaTensor(torch.zeros_like(image.as_tensor(), dtype=torch.uint8), meta=meta)
        return d


class RescaleToHUd(MapTransform):
    """Bring a CT to Hounsfield units at most once, then check that air reads about -1000 HU.

    If the item carries a rescale (``rescale_slope``, ``rescale_intercept``; CT-RATE v1 volumes store raw
    values and the metadata table holds the DICOM rescale), ``HU = slope * value + intercept`` is applied
    and recorded in the image's meta (``hu_rescaled``), so a second application raises. Items without
    a rescale (CT-RATE v2, which is already in HU) are left as they are.

    A floating-point volume with NaN or infinite voxels is refused: resampling would spread them and the
    integer cache could not hold them.

    The air check takes the 1st percentile of the voxels above -1500 HU (outside-field padding such as
    -2048 or -3024 excluded) and requires it within ``air_hu``: a raw volume (air near 0) or a volume
    rescaled twice (air near -2024) fails. Switch it off for crops that may contain no air.

    Args:
        keys: the image key.
        air_hu: accepted range of the air estimate, HU.
        check_air: run the air check.

    Raises:
        BadCaseError: NaN or infinite voxels, the air check fails, or the image was already rescaled; the
            message names the file.
        ValueError: ``check_air`` is not a bool.
    """

    def __init__(
        self, keys: KeysCollection, air_hu: Sequence[float] = (-1100.0, -900.0), check_air: bool = True
    ) -> None:
        super().__init__(keys)
        self.air_hu = (float(air_hu[0]), float(air_hu[1]))
        self.check_air = require_bool(check_air, "hu_air_check")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        slope, intercept = d.get("rescale_slope"), d.get("rescale_intercept")
        for key in self.keys:
            image = d[key]
            name = source_name(image)
            if image.is_floating_point():
                bad = int((~torch.isfinite(image.as_tensor())).sum())
                if bad:
                    raise BadCaseError(f"{name}: {bad} voxels are NaN or infinite; expected finite HU everywhere")
            if slope is not None and intercept is not None:
                if image.meta.get("hu_rescaled", False):
                    raise BadCaseError(f"{name}: already rescaled to HU; refusing to rescale twice")
                image = image.float() * float(slope) + float(intercept)
                image.meta["hu_rescaled"] = True
                d[key] = image
            if self.check_air:
                values = image.as_tensor().flatten()
                values = values[:: max(1, values.numel() // 2_000_000)]  # a strided sample is enough
                values = values[values > -1500]
                air = float(torch.quantile(values.float(), 0.01)) if values.numel() else float("nan")
                if not self.air_hu[0] <= air <= self.air_hu[1]:
                    rescale = (
                        f"after the table's rescale slope={slope} intercept={intercept}"
                        if slope is not None and intercept is not None
                        else "as the reader returned it (a DICOM series' own RescaleSlope/RescaleIntercept applied)"
                    )
                    raise BadCaseError(
                        f"{name}: air reads {air:.0f} HU (1st percentile) {rescale}, expected within {self.air_hu}: "
                        "the volume is not in HU or was rescaled twice"
                    )
        return d


class CheckMinSlicesd(MapTransform):
    """Refuse a volume with fewer than ``min_slices`` slices (a scout or a partial series).

    Run after `Orientationd("RAS")`: slices are the last array axis.

    Raises:
        BadCaseError: too few slices; the message names the file and the count.
    """

    def __init__(self, keys: KeysCollection, min_slices: int) -> None:
        super().__init__(keys)
        self.min_slices = int(min_slices)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        for key in self.keys:
            if data[key].shape[-1] < self.min_slices:
                raise BadCaseError(
                    f"{source_name(data[key])}: {data[key].shape[-1]} slices, fewer than {self.min_slices}"
                )
        return dict(data)


class EndOfCache:
    """Marks where cached preprocessing ends in a transform chain.

    MONAI's `CacheDataset` and `PersistentDataset` cache everything up to the first random transform or
    the first callable that is not a MONAI `Transform`; this marker is such a callable and passes data
    through. Put it after the deterministic, expensive part (load, reorient, resample, store compactly)
    so cropping, windowing and packing run after the cache even in the all-deterministic validation chain.
    """

    def __call__(self, data):
        return data


class RegionSentencesd(MapTransform):
    """Report sentences per anatomical region, for region-sentence alignment.

    Writes ``region_text``: ``R`` strings (the sentences naming region ``r``, joined; ``""`` when none)
    and ``region_normal``: ``(R,)`` bool tensor (every sentence of the region reads as normal). The
    sentences come from the item's ``region_sentences`` when present (RadGenome-ChestCT's
    ``{"anatomy", "sentence"}`` pairs, the anatomy name mapped through the lexicon), otherwise from
    splitting ``text`` into sentences and matching each against the lexicon (no text: all empty).

    Args:
        lexicon: the `RegionLexicon`.
        text_key: key of the report text.
    """

    def __init__(self, lexicon: RegionLexicon, text_key: str = "text") -> None:
        super().__init__(text_key, allow_missing_keys=True)
        self.lexicon = lexicon
        self.text_key = text_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        n = len(self.lexicon.region_names)
        per_region: list[list[str]] = [[] for _ in range(n)]
        pairs = d.get("region_sentences")
        if pairs:
            assigned = [(self.lexicon.regions_of(p["anatomy"]), p["sentence"]) for p in pairs]
        else:
            assigned = [(self.lexicon.regions_of(s), s) for s in split_sentences(d.get(self.text_key) or "")]
        for regions, sentence in assigned:
            for r in regions:
                per_region[r].append(sentence)
        d["region_text"] = [" ".join(s) for s in per_region]
        d["region_normal"] = torch.tensor([bool(s) and all(self.lexicon.is_normal(x) for x in s) for s in per_region])
        return d


class ChainOfThoughtd(MapTransform):
    """Chain-of-thought steps with the regions each names, for step-level alignment.

    Reads the item's ``cot`` (text or list; see `split_cot_steps`) and writes ``cot_steps``: a list of
    ``{"text": step, "regions": [0-based region indices]}`` in order (``[]`` without ``cot``).

    Args:
        lexicon: the `RegionLexicon`.
        cot_key: key of the chain-of-thought text.
    """

    def __init__(self, lexicon: RegionLexicon, cot_key: str = "cot") -> None:
        super().__init__(cot_key, allow_missing_keys=True)
        self.lexicon = lexicon
        self.cot_key = cot_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        steps = split_cot_steps(d.get(self.cot_key))
        d["cot_steps"] = [{"text": s, "regions": self.lexicon.regions_of(s)} for s in steps]
        return d
