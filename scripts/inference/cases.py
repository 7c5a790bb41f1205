"""Which cases an inference run reads: CT NIfTI files and DICOM series folders, their masks and case ids.

Rules (docs/README.md, "Inference"):

- ``datalist`` given: its items (``image``, optional ``seg`` and ``case_id``), paths relative to the
  datalist's folder;
- otherwise ``dataset_dir`` is searched: a NIfTI file (``.nii``, ``.nii.gz``) is one case, a folder that
  holds DICOM files is one case (a DICOM series; file names do not matter); ``dataset_dir`` may itself
  be a NIfTI file or a DICOM folder. Nothing under ``seg_dir`` is ever taken for a CT;
- the mask of a case is the datalist's ``seg``, else ``{seg_dir}/{case_id}.nii.gz`` (or ``.nii``) when
  that file exists, else none (see ``seg_source``);
- ``case_id`` is the datalist's ``case_id``, else the NIfTI file name without its suffix, else the
  DICOM folder's name. Cases are sorted by ``case_id`` (the order on disk does not matter); cases that
  share an id are all refused, naming each other, since their outputs would overwrite each other.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble (any file name)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _within(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder.resolve())


def _scan(dataset_dir: Path, seg_dir: Path | None) -> list[dict]:
    """NIfTI files and DICOM folders under ``dataset_dir`` (``seg_dir`` excluded), as case items."""
    if dataset_dir.is_file():
        if not is_nifti(dataset_dir):
            raise ValueError(f"{dataset_dir}: not a NIfTI file (.nii, .nii.gz) or a folder")
        return [{"image": str(dataset_dir), "case_id": nifti_stem(dataset_dir), "input_kind": "nifti"}]
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset_dir {dataset_dir} does not exist")
    items, skipped = [], 0
    for root, dirs, files in os.walk(dataset_dir, followlinks=True):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs if not _within(root_path / d, seg_dir))
        if _within(root_path, seg_dir):
            continue
        dicom_here = False
        for name in sorted(files):
            path = root_path / name
            if is_nifti(path):
                items.append({"image": str(path), "case_id": nifti_stem(path), "input_kind": "nifti"})
            elif is_dicom_file(path):
                dicom_here = True
            else:
                skipped += 1
        if dicom_here:
            items.append({"image": str(root_path), "case_id": root_path.name, "input_kind": "dicom"})
    if skipped:
        logger.info(f"{dataset_dir}: {skipped} files that are neither NIfTI nor DICOM were ignored")
    return items


def _read_datalist(datalist: Path, section: str) -> list[dict]:
    content = json.loads(datalist.read_text())
    items = content if isinstance(content, list) else content.get(section)
    if not items:
        raise ValueError(f"{datalist}: section {section!r} is missing or empty (or give a JSON list of items)")
    out = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("image"), str):
            raise ValueError(f"{datalist} [{section}] item {index}: needs an 'image' path, got {item!r}")
        resolved = {}
        for key in ("image", "seg"):
            if item.get(key) is not None:
                path = Path(item[key])
                resolved[key] = str(path if path.is_absolute() else datalist.parent / path)
        image = Path(resolved["image"])
        kind = "nifti" if is_nifti(image) else "dicom"
        case_id = item.get("case_id") or (nifti_stem(image) if kind == "nifti" else image.name)
        out.append(dict(resolved, case_id=str(case_id), input_kind=kind))
    return out


def find_cases(
    dataset_dir: str | Path,
    seg_dir: str | Path | None = None,
    datalist: str | Path | None = None,
    datalist_section: str = "testing",
) -> list[dict]:
    """The cases of an inference run, sorted by ``case_id`` (rules in the module docstring).

    Returns:
        one dict per case: ``case_id``, ``image`` (file or DICOM folder), ``input_image`` (the same path,
        kept through preprocessing), ``input_kind`` (``"nifti"`` or ``"dicom"``), ``seg`` and
        ``input_mask`` when a mask was found; ``refusal`` (the reason) for a case refused before loading
        (a shared case id, a missing file, a CT inside ``seg_dir``).

    Raises:
        FileNotFoundError: ``dataset_dir`` or ``datalist`` does not exist.
        ValueError: nothing to read (the message says where it looked), or a malformed datalist.
    """
    dataset_dir = Path(dataset_dir)
    seg_path = Path(seg_dir) if seg_dir else None
    if datalist:
        datalist = Path(datalist)
        if not datalist.is_file():
            raise FileNotFoundError(f"datalist {datalist} does not exist")
        items = _read_datalist(datalist, datalist_section)
        where = f"{datalist} [{datalist_section}]"
    else:
        items = _scan(dataset_dir, seg_path)
        where = f"{dataset_dir}" + (f" (masks in {seg_path} excluded)" if seg_path else "")
    if not items:
        raise ValueError(f"{where}: no CT found (NIfTI files .nii/.nii.gz or folders of DICOM files)")
    by_id: dict[str, list[dict]] = {}
    for item in items:
        by_id.setdefault(item["case_id"], []).append(item)
    cases = []
    for case_id in sorted(by_id):
        group = by_id[case_id]
        for item in group:
            item["input_image"] = item["image"]
            if "seg" not in item and seg_path is not None:
                for suffix in NIFTI_SUFFIXES:
                    candidate = seg_path / f"{case_id}{suffix}"
                    if candidate.is_file():
                        item["seg"] = str(candidate)
                        break
            if "seg" in item:
                item["input_mask"] = item["seg"]
            if len(group) > 1:
                others = [g["image"] for g in group if g is not item]
                item["refusal"] = f"case id {case_id!r} is shared with {others}; give each case its own case_id"
            elif not Path(item["image"]).exists():
                item["refusal"] = f"{item['image']} does not exist"
            elif "seg" in item and not Path(item["seg"]).is_file():
                item["refusal"] = f"mask {item['seg']} of {item['image']} does not exist"
            elif _within(Path(item["image"]), seg_path):
                item["refusal"] = f"{item['image']} lies inside seg_dir {seg_path}: masks are never read as CTs"
            cases.append(item)
    with_mask = sum("seg" in c for c in cases)
    dicom = sum(c["input_kind"] == "dicom" for c in cases)
    logger.info(
        f"{where}: {len(cases)} cases ({dicom} DICOM series, {len(cases) - dicom} NIfTI files), {with_mask} with a mask"
    )
    return cases
