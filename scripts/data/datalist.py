"""MONAI-style JSON datalists of CT, TotalSegmentator label map, report text and study id."""

from __future__ import annotations

import json
from pathlib import Path

REQUIRED_KEYS = ("image", "seg", "text", "study")
PATH_KEYS = ("image", "seg")


def load_datalist(datalist_path: str | Path, section: str, base_dir: str | Path | None = None) -> list[dict]:
    """Read one section of a datalist, resolve its file paths and check every item before training.

    The file follows MONAI's decathlon layout: ``{"training": [item, ...], "validation": [...]}``; each
    item has ``image`` (CT NIfTI, HU), ``seg`` (TotalSegmentator v2 label map of that CT), ``text``
    (report text) and ``study`` (items of one study share one report: several reconstructions of one
    scan). Relative paths are taken from ``base_dir`` (default: the datalist's folder).

    Raises:
        FileNotFoundError: the datalist itself is missing.
        ValueError: the section is missing or empty, or items lack a key, have an empty text, or name
            a file that does not exist; the message names the datalist and lists the bad items.
    """
    datalist_path = Path(datalist_path)
    if not datalist_path.is_file():
        raise FileNotFoundError(f"datalist {datalist_path} does not exist")
    base = Path(base_dir) if base_dir is not None else datalist_path.parent
    items = json.loads(datalist_path.read_text()).get(section)
    if not items:
        raise ValueError(f"{datalist_path}: section {section!r} is missing or empty")
    problems, resolved = [], []
    for index, item in enumerate(items):
        missing = [k for k in REQUIRED_KEYS if k not in item]
        if missing:
            problems.append(f"item {index}: missing {missing}")
            continue
        item = dict(item, study=str(item["study"]))
        if not isinstance(item["text"], str) or not item["text"].strip():
            problems.append(f"item {index} ({item['image']}): empty report text")
        for key in PATH_KEYS:
            path = Path(item[key])
            item[key] = str(path if path.is_absolute() else base / path)
            if not Path(item[key]).is_file():
                problems.append(f"item {index}: {key} file {item[key]} does not exist")
        resolved.append(item)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{datalist_path} [{section}]: {len(problems)} problem(s):\n  {shown}{more}")
    return resolved
