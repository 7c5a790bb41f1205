"""Checks of a DICOM series folder before its pixels are read (by MONAI's `ITKReader`).

ITK reads one series per folder and, when a folder holds several, warns and takes the first; it also
stacks slices with gaps or a gantry tilt into a volume whose geometry is wrong. These checks read the
headers only (pydicom, ``stop_before_pixels``) and refuse such folders with the reason:

- several series (a scout, a second reconstruction kernel): refused naming every SeriesInstanceUID;
- images of one series with different orientations or matrix sizes (a localizer filed in the series);
- slice positions (ImagePositionPatient along the slice normal) unevenly spaced: a missing slice, a
  duplicate position, or a variable-spacing acquisition;
- gantry tilt: the slices step along a direction that is not the slice normal (the stack is sheared);
  refused with the angle, since resampling it onto a regular grid is not this bundle's job (dcm2niix
  does it).

File names and the order of files on disk do not matter: slices are ordered by position.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..data import BadCaseError
from .cases import is_dicom_file, is_nifti

HEADER_TAGS = [
    "SeriesInstanceUID",
    "SeriesDescription",
    "ConvolutionKernel",
    "ImageType",
    "Modality",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "GantryDetectorTilt",
]


def _text(value) -> str:
    """A header value as text; the values of a multi-valued element (kernel, image type) joined by ``/``."""
    if value is None or isinstance(value, str):
        return value or ""
    try:
        return "/".join(str(v) for v in value)
    except TypeError:
        return str(value)


def _describe_series(uid: str, headers: list) -> str:
    first = headers[0]
    return (
        f"{uid} ({len(headers)} image{'s' if len(headers) > 1 else ''}, description {_text(first.get('SeriesDescription'))!r}, "
        f"kernel {_text(first.get('ConvolutionKernel'))!r}, image type {_text(first.get('ImageType'))!r})"
    )


def check_dicom_series(
    folder: str | Path, spacing_rtol: float = 0.01, spacing_atol_mm: float = 0.01, max_tilt_deg: float = 0.5
) -> dict:
    """Check that a folder holds one regular axial-stack DICOM series and describe it.

    Args:
        folder: the DICOM folder (one case).
        spacing_rtol, spacing_atol_mm: tolerance on each slice gap against the median gap.
        max_tilt_deg: largest accepted angle between the slice step and the slice normal, degrees.

    Returns:
        ``{"n_images", "slice_spacing_mm", "pixel_spacing_mm" (row, column), "rows", "columns",
        "modality", "series_description", "convolution_kernel"}``: no patient or study identifiers.

    Raises:
        BadCaseError: no DICOM file, several series, mixed orientations or sizes, a missing position,
            uneven slice gaps, gantry tilt; the message names the folder and the numbers.
    """
    import pydicom

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not is_nifti(p) and is_dicom_file(p))
    if not files:
        raise BadCaseError(f"{folder}: no DICOM files")
    series: dict[str, list] = {}
    for path in files:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
        series.setdefault(str(header.get("SeriesInstanceUID", "<no SeriesInstanceUID>")), []).append(header)
    if len(series) > 1:
        listed = "; ".join(_describe_series(uid, hs) for uid, hs in sorted(series.items()))
        raise BadCaseError(
            f"{folder}: {len(series)} DICOM series in one folder: {listed}. Put each series in its own folder "
            "(a scout or a second reconstruction is a series of its own)"
        )
    ((uid, headers),) = series.items()
    if len(headers) < 2:
        raise BadCaseError(f"{folder}: series {uid} has {len(headers)} image: not a volume (a scout?)")
    missing = [
        str(files[i].name)
        for i, h in enumerate(headers)
        if "ImagePositionPatient" not in h or "ImageOrientationPatient" not in h
    ]
    if missing:
        raise BadCaseError(
            f"{folder}: {len(missing)} images without ImagePositionPatient/ImageOrientationPatient, e.g. {missing[:3]}"
        )
    shapes = {
        (int(h.Rows), int(h.Columns), tuple(round(float(v), 4) for v in h.ImageOrientationPatient)) for h in headers
    }
    if len(shapes) > 1:
        raise BadCaseError(
            f"{folder}: series {uid} mixes {len(shapes)} image geometries (rows, columns, orientation): "
            f"{sorted(shapes)[:3]}; a localizer in the series? Keep only the axial stack"
        )
    orientation = np.asarray([float(v) for v in headers[0].ImageOrientationPatient], dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.asarray([[float(v) for v in h.ImagePositionPatient] for h in headers], dtype=np.float64)
    order = np.argsort(positions @ normal)
    positions = positions[order]
    along = positions @ normal  # mm along the slice normal, ascending
    gaps = np.diff(along)
    median = float(np.median(gaps))
    if median <= 0 or (gaps <= spacing_atol_mm).any():
        at = along[1:][gaps <= spacing_atol_mm]
        raise BadCaseError(
            f"{folder}: {int((gaps <= spacing_atol_mm).sum())} pairs of images share a slice position "
            f"(at {np.round(at[:3], 2).tolist()} mm along the normal): two reconstructions in one series?"
        )
    uneven = np.abs(gaps - median) > max(spacing_atol_mm, spacing_rtol * median)
    if uneven.any():
        first = int(np.flatnonzero(uneven)[0])
        raise BadCaseError(
            f"{folder}: uneven slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm (median "
            f"{median:.3f}), first odd gap of {gaps[first]:.3f} mm after the slice at {along[first]:.2f} mm "
            f"({int(uneven.sum())} odd gaps; a missing slice?)"
        )
    step = positions[-1] - positions[0]
    tilt = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / float(np.linalg.norm(step)))))
    if tilt > max_tilt_deg:
        header_tilt = headers[0].get("GantryDetectorTilt")
        raise BadCaseError(
            f"{folder}: gantry tilt: slices step {tilt:.1f} degrees off the slice normal (GantryDetectorTilt "
            f"{header_tilt}), so the stack is sheared; resample it onto a regular grid first (e.g. dcm2niix, "
            "which corrects gantry tilt) and pass the NIfTI"
        )
    first = headers[0]
    return {
        "n_images": len(headers),
        "slice_spacing_mm": round(median, 4),
        "pixel_spacing_mm": [float(v) for v in first.get("PixelSpacing", [])],
        "rows": int(first.Rows),
        "columns": int(first.Columns),
        "modality": str(first.get("Modality", "")),
        "series_description": _text(first.get("SeriesDescription")),
        "convolution_kernel": _text(first.get("ConvolutionKernel")),
    }


class CheckDicomSeriesd(MapTransform):
    """Run `check_dicom_series` on a case whose image is a folder, before it is loaded.

    Writes ``dicom`` (the series description of `check_dicom_series`) into the item; NIfTI cases pass
    unchanged.

    Raises:
        BadCaseError: from `check_dicom_series`.
    """

    def __init__(self, keys: KeysCollection = "image") -> None:
        super().__init__(keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.keys:
            if isinstance(d.get(key), str) and Path(d[key]).is_dir():
                d["dicom"] = check_dicom_series(d[key])
        return d
