"""OmniAbnorm-CT-14K (OminiAbnorm-CT): 2-D CT slices with grounded, described abnormalities.

Zhao et al., "Rethinking Whole-Body CT Image Interpretation: An Abnormality-Centric Approach",
arXiv:2506.03238; data at https://huggingface.co/datasets/zzh99/OmniAbnorm-CT-14K. Implemented layout,
as the authors' own dataset code reads it (github.com/zhaoziheng/OmniAbnorm-CT,
``dataset/train_dataset_grounding.py``, commit 9879bac): an index JSON maps sample ids to records

- ``image``: a folder with the key slice ``0.jpeg`` (or ``0.jpg``) and context slices named by their
  offset from it (``-2.jpg``, ``-1.jpg``, ``1.jpg``, ...);
- ``context``: the offsets present (e.g. ``[-2, -1, 1, 2]``);
- ``mask``: a folder with one grayscale mask ``{abnormality id}.jpeg`` per abnormality, on the key slice;
- ``abnormality``: a list of ``{"id", "group_id", "label", "description"}``: ``label`` is the
  taxonomy category, ``description`` the report text of the finding (may be empty).

Folders may be absolute or relative to the index file. One item per abnormality: the slices (context
in offset order around the key slice), its mask, its text (the description, or the label when the
description is empty) and its label, for abnormality-level text and grounding evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

SUFFIXES = (".jpeg", ".jpg", ".png")


def _slice_file(folder: Path, offset: int) -> Path | None:
    for suffix in SUFFIXES:
        if (folder / f"{offset}{suffix}").is_file():
            return folder / f"{offset}{suffix}"
    return None


def load_omniabnorm(index_json: str | Path, root: str | Path | None = None) -> list[dict]:
    """Items of an OmniAbnorm-CT-14K index, one per abnormality.

    Each item: ``image`` (slice paths, ordered by offset, key slice included), ``key_slice`` (its
    position in ``image``), ``mask`` (the abnormality's mask path), ``text``, ``label``, ``case_id``
    (sample id), ``abnormality_id``, ``group_id``. Load with MONAI ``LoadImaged(keys=["image", "mask"])``:
    a list of slices stacks into ``(S, W, H)`` (PIL reader, width first), the mask is ``(W, H)``.

    Args:
        index_json: the index file.
        root: folder that relative ``image``/``mask`` paths start from (default: the index's folder).

    Raises:
        FileNotFoundError: the index is missing.
        ValueError: records with a missing key slice, context slice or mask, or an abnormality without
            label and description; all listed with their sample ids.
    """
    index_json = Path(index_json)
    if not index_json.is_file():
        raise FileNotFoundError(f"OmniAbnorm-CT index {index_json} does not exist")
    base = Path(root) if root is not None else index_json.parent
    records = json.loads(index_json.read_text())
    items, problems = [], []
    for sample_id, record in records.items():
        image_dir = base / record["image"]
        offsets = sorted({int(o) for o in record.get("context", [])} | {0})
        slices = [_slice_file(image_dir, o) for o in offsets]
        missing = [o for o, s in zip(offsets, slices) if s is None]
        if missing:
            problems.append(f"{sample_id}: slices {missing} missing in {image_dir}")
            continue
        for abnormality in record.get("abnormality", []):
            mask = _slice_file(base / record["mask"], abnormality["id"])
            text = (abnormality.get("description") or "").strip() or (abnormality.get("label") or "").strip()
            if mask is None:
                problems.append(f"{sample_id}: mask {abnormality['id']} missing in {base / record['mask']}")
            elif not text:
                problems.append(f"{sample_id}: abnormality {abnormality['id']} has neither description nor label")
            else:
                items.append(
                    {
                        "image": [str(s) for s in slices],
                        "key_slice": offsets.index(0),
                        "mask": str(mask),
                        "text": text,
                        "label": abnormality.get("label", ""),
                        "case_id": str(sample_id),
                        "abnormality_id": str(abnormality["id"]),
                        "group_id": str(abnormality.get("group_id", abnormality["id"])),
                    }
                )
    if problems:
        shown = "\n  ".join(problems[:20])
        raise ValueError(f"{index_json}: {len(problems)} problem(s):\n  {shown}")
    return items
