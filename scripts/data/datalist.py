"""Datalists of CT, TotalSegmentator label map, report text and study id: MONAI JSON or CT-RATE as downloaded."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .ctrate import FINDINGS, build_ctrate_datalist, is_ctrate_layout

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("image", "text", "study")
PATH_KEYS = ("image", "seg")
SECTIONS = ("training", "validation")
MISSING_SEG = ("error", "no_regions")


def _labels(value, where: str) -> list[float]:
    """18 CT-RATE labels as floats (NaN = unknown) from a list, a {finding: value} dict or nothing."""
    if value is None:
        return [math.nan] * len(FINDINGS)
    if isinstance(value, dict):
        unknown = set(value) - set(FINDINGS)
        if unknown:
            raise ValueError(f"{where}: unknown findings {sorted(unknown)}; expected names from {FINDINGS}")
        value = [value.get(f) for f in FINDINGS]
    if not isinstance(value, (list, tuple)) or len(value) != len(FINDINGS):
        count = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"{where}: labels are {count}, expected {len(FINDINGS)} values in the order of {FINDINGS}")
    out = []
    for finding, v in zip(FINDINGS, value):
        if v is None:
            out.append(math.nan)
        elif isinstance(v, bool) or (isinstance(v, (int, float)) and (v in (0, 1) or math.isnan(v))):
            out.append(float(v))
        else:
            raise ValueError(f"{where}: label {finding!r} is {v!r}; expected 0, 1 or null (unknown)")
    return out


def load_datalist(
    datalist_path: str | Path, section: str, base_dir: str | Path | None = None, missing_seg: str = "error"
) -> list[dict]:
    """Read one section of a datalist, resolve its file paths and check every item before training.

    The file follows MONAI's decathlon layout: ``{"training": [item, ...], "validation": [...]}``; each
    item has ``image`` (CT NIfTI, HU), ``seg`` (TotalSegmentator v2 label map of that CT), ``text``
    (report text) and ``study`` (items of one study share one report: several reconstructions of one
    scan). Optional: ``case_id`` (default: the image file name without extension), ``labels`` (the 18
    CT-RATE findings as a list in `FINDINGS` order or a ``{finding: 0/1}`` dict; missing = unknown),
    ``cot`` (chain-of-thought text or steps), ``region_sentences``, ``patient``. Relative paths are taken
    from ``base_dir`` (default: the datalist's folder). Items of a section other than ``training`` that
    share a ``patient``, a ``study`` or a CT file with the training list are reported in a warning.

    Args:
        missing_seg: ``"error"`` (an item without ``seg`` is a problem) or ``"no_regions"`` (it trains
            without region tokens; the count is logged).

    Raises:
        FileNotFoundError: the datalist itself is missing.
        ValueError: the section is missing or empty, or items lack a key, have an empty text, name a
            file that does not exist, or carry malformed labels; the message names the datalist and
            lists the problems, those of the file's other sections (`SECTIONS`) included.
    """
    if missing_seg not in MISSING_SEG:
        raise ValueError(f"missing_seg must be one of {MISSING_SEG}, got {missing_seg!r}")
    datalist_path = Path(datalist_path)
    if not datalist_path.is_file():
        raise FileNotFoundError(f"datalist {datalist_path} does not exist")
    base = Path(base_dir) if base_dir is not None else datalist_path.parent
    datalist = json.loads(datalist_path.read_text())
    items = datalist.get(section)
    if not items:
        raise ValueError(f"{datalist_path}: section {section!r} is missing or empty")
    resolved, problems, without_seg = _check_items(items, base, missing_seg)
    if problems:
        # every section of the file is checked before stopping, so one run lists all that needs fixing
        for other in SECTIONS:
            if other != section and isinstance(datalist.get(other), list):
                problems += [f"[{other}] {p}" for p in _check_items(datalist[other], base, missing_seg)[1]]
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{datalist_path} [{section}]: {len(problems)} problem(s):\n  {shown}{more}")
    if section != "training":
        _report_shared_patients(datalist_path, section, resolved, datalist, base)
    if without_seg:
        logger.warning(
            f"{datalist_path} [{section}]: {without_seg} of {len(resolved)} items have no mask; they train without region tokens"
        )
    return resolved


def _check_items(items: list, base: Path, missing_seg: str) -> tuple[list[dict], list[str], int]:
    """Resolve and check the items of one datalist section: ``(resolved items, problems, items without seg)``."""
    problems, resolved, without_seg = [], [], 0
    for index, item in enumerate(items):
        missing = [k for k in REQUIRED_KEYS + (("seg",) if missing_seg == "error" else ()) if k not in item]
        if missing:
            problems.append(f"item {index}: missing {missing}")
            continue
        if not isinstance(item["study"], (str, int)) or isinstance(item["study"], bool):
            problems.append(f"item {index}: study must be a string or an integer id, got {item['study']!r}")
            continue
        item = dict(item, study=str(item["study"]))
        if not isinstance(item["text"], str) or not item["text"].strip():
            problems.append(f"item {index} ({item['image']}): empty report text")
        for key in PATH_KEYS:
            if key not in item:
                continue
            if not isinstance(item[key], str) or not item[key]:
                problems.append(f"item {index}: {key} must be a file path, got {item[key]!r}")
                continue
            path = Path(item[key])
            item[key] = str(path if path.is_absolute() else base / path)
            if not Path(item[key]).is_file():
                problems.append(f"item {index}: {key} file {item[key]} does not exist")
        without_seg += "seg" not in item
        item.setdefault("case_id", Path(str(item["image"])).name.split(".")[0])
        try:
            item["labels"] = _labels(item.get("labels"), f"item {index}")
        except ValueError as err:
            problems.append(str(err))
        resolved.append(item)
    return resolved, problems, without_seg


def _report_shared_patients(datalist_path: Path, section: str, items: list[dict], datalist: dict, base: Path) -> None:
    """Warn when items of ``section`` share a patient (``patient`` key), a study or a CT file with the
    training list: their scores would measure memory, not generalisation."""
    training = datalist.get("training") or []
    seen: dict[tuple[str, str], int] = {}
    for index, item in enumerate(training):
        if isinstance(item.get("image"), str) and item["image"]:
            seen[("CT", str((base / item["image"]).resolve()))] = index
        for key in ("patient", "study"):
            if key in item:
                seen[(key, str(item[key]))] = index
    shared = []
    for index, item in enumerate(items):
        keys = [("patient", str(item["patient"]))] if "patient" in item else []
        keys += [("study", str(item["study"])), ("CT", str(Path(item["image"]).resolve()))]
        hit = next((k for k in keys if k in seen), None)
        if hit is not None:
            shared.append(f"item {index} ({item['case_id']}) and training item {seen[hit]} share {hit[0]} {hit[1]}")
    if shared:
        logger.warning(
            f"{datalist_path} [{section}]: {len(shared)} of {len(items)} items share a patient, study or CT with the "
            f"training list, so their scores are optimistic; first: " + "; ".join(shared[:3])
        )


def load_pairs(
    dataset_dir: str | Path,
    section: str,
    text_model_name: str | None = None,
    max_length: int = 512,
    seg_dir: str | Path | None = None,
    seg_pattern: str = "{split}/{patient}/{scan}/{volume}",
    missing_seg: str = "error",
    volume_version: str = "v2",
    cot_file: str | Path | None = None,
) -> list[dict]:
    """The (CT, mask, report) items of ``dataset_dir``, whatever its layout.

    ``DIR/datalist.json`` (MONAI layout, `load_datalist`; texts longer than ``max_length`` tokens are
    counted in a warning) wins; otherwise a CT-RATE download is read directly
    (`scripts.data.ctrate.build_ctrate_datalist`: reports fitted to the tokenizer of
    ``text_model_name`` within ``max_length`` tokens, masks from ``seg_dir`` by ``seg_pattern``). Each
    item gets ``case_index``, its position in the list (the evaluation's key for de-duplicating cases
    across DDP ranks).

    Raises:
        ValueError: neither layout is found (the message says what was looked for), or the loaders' errors.
    """
    dataset_dir = Path(dataset_dir)
    tokenizer = None
    if text_model_name is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(text_model_name))
    if (dataset_dir / "datalist.json").is_file():
        items = load_datalist(dataset_dir / "datalist.json", section, dataset_dir, missing_seg)
        if tokenizer is not None:
            long = sum(len(ids) > max_length for ids in tokenizer([it["text"] for it in items])["input_ids"])
            if long:
                logger.warning(
                    f"{dataset_dir / 'datalist.json'} [{section}]: {long} of {len(items)} texts exceed "
                    f"{max_length} tokens and lose their end; put the impression first or shorten them"
                )
    elif dataset_dir.is_dir() and is_ctrate_layout(dataset_dir):
        items = build_ctrate_datalist(
            dataset_dir, section, seg_dir, seg_pattern, missing_seg, volume_version, tokenizer, max_length, cot_file
        )
    else:
        raise ValueError(
            f"{dataset_dir}: neither a datalist.json (MONAI layout) nor a CT-RATE download (*_reports.csv with "
            "{train,valid}[_fixed]/<patient>/<scan>/<volume>.nii.gz) was found"
        )
    return [dict(item, case_index=i) for i, item in enumerate(items)]
