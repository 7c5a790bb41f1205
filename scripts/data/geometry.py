"""Which world grid a loaded CT or mask lies on: header, metadata table, and the two ways of reading a header.

A NIfTI file states its grid in its header (sform or qform); nibabel (MONAI's reader) and ITK pick between
the two forms differently, and some files carry only a placeholder (identity affine, or neither form set),
as the raw CT-RATE v1 volumes do. CT-RATE's metadata table holds each volume's DICOM geometry
(``XYSpacing``, ``ZSpacing``, ``ImageOrientationPatient``, ``ImagePositionPatient``), from which the
dataset's v2 release rebuilt its headers. `ResolveGeometryd` makes the choice once per file and logs it.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .transforms import BadCaseError, source_name

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _fmt(affine: np.ndarray) -> list:
    return np.round(np.asarray(affine, dtype=np.float64), 3).tolist()


def is_placeholder_header(affine: np.ndarray, meta: Mapping) -> bool:
    """Whether a header states no real grid: neither sform nor qform set, or an identity affine (1 mm, origin 0)."""
    codes = [int(np.asarray(meta[k]).item()) for k in ("sform_code", "qform_code") if k in meta]
    unset = len(codes) == 2 and not any(codes)
    return unset or bool(np.allclose(np.asarray(affine, dtype=np.float64), np.eye(4), atol=1e-6))


def table_affine(
    spacing_mm: Sequence[float],
    orientation: Sequence[float] | None,
    position: Sequence[float] | None,
    header_affine: np.ndarray,
) -> np.ndarray:
    """RAS affine ``(4, 4)`` of a volume from its DICOM geometry (CT-RATE metadata table).

    Voxel axes follow the DICOM/ITK convention: axis 0 runs along the row direction (the first three
    values of ``ImageOrientationPatient``, LPS), axis 1 along the column direction (the last three), axis
    2 along their cross product; ``ImagePositionPatient`` (LPS, mm) is voxel (0, 0, 0). Without an
    orientation the header's axis directions are kept, without a position the header's origin.

    Args:
        spacing_mm: ``(x, y, z)`` voxel spacing in mm (``XYSpacing``, ``ZSpacing``).
        orientation: 6 direction cosines (LPS) or ``None``.
        position: 3 coordinates (LPS, mm) or ``None``.
        header_affine: the header's RAS affine, for what the table lacks.

    Raises:
        ValueError: a non-positive spacing, or an orientation that is not two orthogonal unit vectors.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"table spacing must be 3 positive values in mm, got {list(spacing_mm)}")
    header_lps = LPS_TO_RAS @ np.asarray(header_affine, dtype=np.float64)  # the flip is its own inverse
    if orientation is not None:
        row, col = np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64)
        if not (np.allclose([row @ row, col @ col], 1.0, atol=1e-3) and abs(row @ col) < 1e-3):
            raise ValueError(f"ImageOrientationPatient {list(orientation)} is not two orthogonal unit vectors")
        direction = np.stack([row, col, np.cross(row, col)], axis=1)
    else:
        direction = header_lps[:3, :3] / np.linalg.norm(header_lps[:3, :3], axis=0)
    affine = np.eye(4)
    affine[:3, :3] = direction * spacing
    affine[:3, 3] = np.asarray(position, dtype=np.float64) if position is not None else header_lps[:3, 3]
    return LPS_TO_RAS @ affine


def itk_header_affine(path: str) -> np.ndarray:
    """The RAS affine ``(4, 4)`` ITK (SimpleITK) reads from a NIfTI header; reads the header only.

    Raises:
        RuntimeError: ITK cannot place the file (for example non-orthonormal direction cosines, a sheared
            gantry-tilt grid); the message is ITK's.
    """
    import SimpleITK as sitk  # noqa: N813 (the library's own short name)

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    dim = reader.GetDimension()  # a 4-D file: its first three axes
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(reader.GetSpacing(), dtype=np.float64)[:3]
    affine[:3, 3] = reader.GetOrigin()[:3]
    return LPS_TO_RAS @ affine  # ITK works in LPS


class ResolveGeometryd(MapTransform):
    """Decide the world grid of a CT (and its mask) right after `LoadImaged`, logging each decision once per file.

    The decisions, each logged at WARNING with the file name and both values:

    - **metadata table vs header** (the item's ``table_key``, written by the CT-RATE datalist builder):
      with ``source="table"`` (CT-RATE v1, whose headers are blank) the table's spacing, and its
      orientation and position where present, make the affine (`table_affine`); with ``source="header"``
      (v2, ``*_fixed``) the header stays and a table spacing that differs is logged. A placeholder header
      (`is_placeholder_header`) never wins over a table: the table is used whatever ``source`` says.
    - **placeholder without a table**: the header's grid is used as stated (1 mm, origin 0), logged.
    - **nibabel vs ITK**: a header in use is read a second time with SimpleITK (`itk_header_affine`); where
      ITK places the file elsewhere (sform and qform disagree, neither set) or cannot place it (a sheared
      grid), both are logged and nibabel's reading (MONAI's, sform first) is kept.

    The mask follows the CT when its header is a placeholder on the CT's voxel grid (same shape): it then
    gets the CT's affine. Otherwise it keeps its own header, and `CheckSameGridd` compares the two.

    Args:
        keys: ``(image_key, label_key)``; the label is optional in the item.
        table_key: item key of the table geometry ``{"source": "table" | "header", "spacing_mm": (x, y, z)
            or None, "orientation": 6 floats or None, "position": 3 floats or None}``.
        atol_mm: tolerance for two affines to agree, mm.
        rtol: relative tolerance for two spacings to agree.

    Raises:
        BadCaseError: the table's geometry is malformed (names the file).
    """

    def __init__(
        self, keys: KeysCollection, table_key: str = "table_geometry", atol_mm: float = 1e-3, rtol: float = 0.01
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if len(self.keys) != 2:
            raise ValueError(f"ResolveGeometryd takes (image_key, label_key), got {self.keys}")
        self.table_key = table_key
        self.atol_mm = float(atol_mm)
        self.rtol = float(rtol)
        self._logged: set[tuple[str, str]] = set()

    def _log_once(self, name: str, kind: str, message: str) -> None:
        if (name, kind) not in self._logged:
            self._logged.add((name, kind))
            logger.warning(message)

    def _compare_with_itk(self, arr: MetaTensor, name: str) -> None:
        if not name.endswith((".nii", ".nii.gz")):
            return
        nib_affine = np.asarray(arr.affine, dtype=np.float64)
        form = {True: "sform", False: "qform"}[int(np.asarray(arr.meta.get("sform_code", 0)).item()) > 0]
        try:
            itk_affine = itk_header_affine(name)
        except RuntimeError as err:
            first_line = str(err).strip().splitlines()[-1]
            self._log_once(
                name,
                "itk",
                f"{name}: ITK cannot place this file ({first_line}); using nibabel's {form} {_fmt(nib_affine)}",
            )
            return
        if not np.allclose(nib_affine, itk_affine, rtol=0, atol=self.atol_mm):
            self._log_once(
                name,
                "itk",
                f"{name}: nibabel and ITK place this file differently: nibabel ({form}) {_fmt(nib_affine)}, "
                f"ITK {_fmt(itk_affine)}; using nibabel's",
            )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image_key, label_key = self.keys
        image, label = d[image_key], d.get(label_key)
        table = d.get(self.table_key) or {}
        name = source_name(image)
        header = np.asarray(image.affine, dtype=np.float64)
        placeholder = is_placeholder_header(header, image.meta)
        spacing = table.get("spacing_mm")
        header_spacing = np.linalg.norm(header[:3, :3], axis=0)
        if spacing is not None and (table.get("source") == "table" or placeholder):
            try:
                new = table_affine(spacing, table.get("orientation"), table.get("position"), header)
            except ValueError as err:
                raise BadCaseError(f"{name}: metadata table geometry unusable: {err}") from err
            parts = [f"spacing {list(spacing)} mm"] + [
                f"{k} {table[k]}" for k in ("orientation", "position") if table.get(k) is not None
            ]
            self._log_once(
                name,
                "table",
                f"{name}: grid from the metadata table ({', '.join(parts)}) -> affine {_fmt(new)}, not the "
                f"{'placeholder ' if placeholder else ''}header affine {_fmt(header)}",
            )
            image.affine = torch.as_tensor(new, dtype=torch.float64)
            if isinstance(label, MetaTensor):
                label_name = source_name(label)
                label_header = np.asarray(label.affine, dtype=np.float64)
                if label.shape[1:] == image.shape[1:] and is_placeholder_header(label_header, label.meta):
                    self._log_once(
                        label_name,
                        "table",
                        f"{label_name}: placeholder header {_fmt(label_header)} on the grid of {name}; "
                        f"using the CT's table affine {_fmt(new)}",
                    )
                    label.affine = torch.as_tensor(new, dtype=torch.float64)
                    label = None  # its header is not used: nothing to compare with ITK
            image = None  # likewise
        elif spacing is not None and not np.allclose(header_spacing, spacing, rtol=self.rtol):
            self._log_once(
                name,
                "table",
                f"{name}: header spacing {header_spacing.round(4).tolist()} mm differs from the metadata table "
                f"{list(spacing)} mm; using the header (a *_fixed CT-RATE volume)",
            )
        elif placeholder:
            self._log_once(
                name,
                "placeholder",
                f"{name}: the header states no grid (affine {_fmt(header)}, sform/qform unset or identity) and no "
                "metadata table gives one; using it as stated",
            )
        for arr in (image, label):  # the headers in use, read a second time by ITK
            if isinstance(arr, MetaTensor):
                self._compare_with_itk(arr, source_name(arr))
        return d
