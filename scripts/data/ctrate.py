"""CT-RATE as downloaded: volumes, reports, metadata and abnormality labels joined into a datalist.

CT-RATE (Hamamci et al., arXiv:2403.17834; https://huggingface.co/datasets/ibrahimhamamci/CT-RATE)
ships, under one root (any depth):

- volumes ``{train,valid}/<patient>/<scan>/<volume>.nii.gz`` (v1, raw values: the DICOM rescale is in the
  metadata table) and ``{train,valid}_fixed/...`` (v2, already in HU), named
  ``train_12_a_2.nii.gz`` = split ``train``, patient ``train_12``, scan ``train_12_a``, reconstruction 2;
- ``train_reports.csv`` / ``validation_reports.csv``: ``VolumeName, ClinicalInformation_EN, Technique_EN,
  Findings_EN, Impressions_EN``;
- ``train_metadata.csv`` / ``validation_metadata.csv``: ``VolumeName``, ``RescaleSlope``,
  ``RescaleIntercept``, ``XYSpacing`` (``"[0.7, 0.7]"``), ``ZSpacing`` among others;
- ``train_predicted_labels.csv`` / ``valid_predicted_labels.csv``: ``VolumeName`` and the 18 abnormality
  columns of `FINDINGS`;
- optionally RadGenome-ChestCT's region sentences ``*_region_report.csv``: ``Volumename, Anatomy, Sentence``.

Reconstructions of one scan share one report and form one study (never negatives of each other).
"""

from __future__ import annotations

import ast
import json
import logging
import math
import re
from pathlib import Path

import pandas as pd

from .reports import assemble_report, fit_report

logger = logging.getLogger(__name__)

FINDINGS = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

SPLITS = {"training": "train", "validation": "valid"}
_VOLUME = re.compile(r"^(?P<split>train|valid)_(?P<patient>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)\.nii\.gz$")


def parse_volume_name(name: str) -> dict[str, str]:
    """Fields of a CT-RATE ``VolumeName``: split, patient, scan, reconstruction, stem.

    Raises:
        ValueError: the name does not follow ``{split}_{patient}_{scan}_{reconstruction}.nii.gz``.
    """
    m = _VOLUME.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a CT-RATE volume name (e.g. train_12_a_2.nii.gz)")
    split, patient, scan = m["split"], f"{m['split']}_{m['patient']}", f"{m['split']}_{m['patient']}_{m['scan']}"
    return {
        "split": split,
        "patient": patient,
        "scan": scan,
        "reconstruction": m["recon"],
        "volume": name,
        "stem": name[: -len(".nii.gz")],
    }


def is_ctrate_layout(dataset_dir: str | Path) -> bool:
    """Whether a folder holds a CT-RATE reports table (``*_reports.csv``) somewhere below it."""
    return any(Path(dataset_dir).rglob("*_reports.csv"))


def _find_table(root: Path, split: str, pattern: str) -> Path | None:
    """The one CSV below ``root`` whose name starts with the split ("train" / "valid") and matches."""
    hits = sorted(p for p in root.rglob(pattern) if p.name.startswith(split))
    if len(hits) > 1:
        raise ValueError(f"{root}: several {pattern} tables for split {split!r}: {[str(h) for h in hits]}")
    return hits[0] if hits else None


def _index_volumes(root: Path, split: str) -> dict[str, dict[str, Path]]:
    """VolumeName -> {"v1": path, "v2": path} for the volumes of one split."""
    found: dict[str, dict[str, Path]] = {}
    for folder, version in ((split, "v1"), (f"{split}_fixed", "v2")):
        for path in root.rglob(f"{folder}/*/*/*.nii.gz"):
            found.setdefault(path.name, {})[version] = path
    return found


def _xy_spacing(value) -> float | None:
    """CT-RATE ``XYSpacing`` ("[0.75, 0.75]") -> 0.75; ``None`` when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    parsed = ast.literal_eval(value) if isinstance(value, str) else value
    return float(parsed[0] if isinstance(parsed, (list, tuple)) else parsed)


def build_ctrate_datalist(
    dataset_dir: str | Path,
    section: str,
    seg_dir: str | Path | None = None,
    seg_pattern: str = "{split}/{patient}/{scan}/{volume}",
    missing_seg: str = "error",
    volume_version: str = "v2",
    tokenizer=None,
    max_length: int = 512,
    cot_file: str | Path | None = None,
) -> list[dict]:
    """Join a CT-RATE download into datalist items (see the module docstring for the layout).

    Each item: ``image``, ``seg`` (absent when the mask is missing and ``missing_seg="no_regions"``),
    ``text`` (findings + impression, fitted to ``max_length`` tokens keeping the impression when a
    tokenizer is given), ``study`` (the scan), ``case_id`` (the volume stem), ``labels`` (18 floats, NaN
    when unknown), ``metadata_spacing_mm`` (x, y, z from the metadata table), ``rescale_slope`` and
    ``rescale_intercept`` (v1 volumes only), and when available ``region_sentences`` (RadGenome) and
    ``cot``.

    Args:
        dataset_dir: the CT-RATE root.
        section: ``"training"`` (CT-RATE ``train``) or ``"validation"`` (``valid``).
        seg_dir: root of the TotalSegmentator masks; ``None`` = ``dataset_dir``.
        seg_pattern: mask path below ``seg_dir``, formatted with ``split``, ``patient``, ``scan``,
            ``reconstruction``, ``volume`` (file name) and ``stem``.
        missing_seg: ``"error"`` (stop, listing the volumes) or ``"no_regions"`` (train without region
            tokens); the count is logged either way.
        volume_version: ``"v2"`` (``*_fixed`` folders, HU; falls back to v1 where v2 is missing) or
            ``"v1"`` (raw values rescaled with the metadata's slope and intercept).
        tokenizer: the text encoder's tokenizer, to fit reports to ``max_length`` tokens.
        max_length: the text encoder's token limit.
        cot_file: optional JSON ``{VolumeName: chain-of-thought text or list of steps}``.

    Raises:
        ValueError: unknown section or option; no volumes; volumes without a report row, v1 volumes
            without rescale metadata, or (with ``missing_seg="error"``) without a mask: listed by name.
    """
    if section not in SPLITS:
        raise ValueError(f"section must be one of {tuple(SPLITS)}, got {section!r}")
    if missing_seg not in ("error", "no_regions") or volume_version not in ("v1", "v2"):
        raise ValueError(
            f"missing_seg must be 'error'/'no_regions' and volume_version 'v1'/'v2', got {missing_seg!r}, {volume_version!r}"
        )
    root, split = Path(dataset_dir), SPLITS[section]
    seg_root = Path(seg_dir) if seg_dir is not None else root
    volumes = _index_volumes(root, split)
    if not volumes:
        raise ValueError(
            f"{root}: no CT-RATE volumes under {split}/ or {split}_fixed/ (<patient>/<scan>/<volume>.nii.gz)"
        )
    reports_csv = _find_table(root, split, "*_reports.csv")
    if reports_csv is None:
        raise ValueError(f"{root}: no reports table for split {split!r} (e.g. {split}_reports.csv)")
    reports = pd.read_csv(reports_csv).set_index("VolumeName")
    metadata_csv = _find_table(root, split, "*_metadata.csv")
    metadata = pd.read_csv(metadata_csv).set_index("VolumeName") if metadata_csv else None
    labels_csv = _find_table(root, split, "*labels.csv")
    labels = pd.read_csv(labels_csv).set_index("VolumeName") if labels_csv else None
    if labels is not None and set(FINDINGS) - set(labels.columns):
        raise ValueError(f"{labels_csv}: missing label columns {sorted(set(FINDINGS) - set(labels.columns))}")
    region_csv = _find_table(root, split, "*region_report.csv")
    region_sentences: dict[str, list[dict]] = {}
    if region_csv is not None:
        for row in pd.read_csv(region_csv).itertuples(index=False):
            region_sentences.setdefault(row.Volumename, []).append(
                {"anatomy": str(row.Anatomy), "sentence": str(row.Sentence)}
            )
    cot = json.loads(Path(cot_file).read_text()) if cot_file else {}

    items, problems, missing_masks, shortened = [], [], [], 0
    for name in sorted(volumes):
        fields = parse_volume_name(name)
        version = volume_version if volume_version in volumes[name] else next(iter(volumes[name]))
        if name not in reports.index:
            problems.append(f"{name}: no row in {reports_csv.name} (missing report)")
            continue
        report = reports.loc[name]
        if tokenizer is not None:
            text, cut = fit_report(report.get("Findings_EN"), report.get("Impressions_EN"), tokenizer, max_length)
            shortened += cut
        else:
            text = assemble_report(report.get("Findings_EN"), report.get("Impressions_EN"))
        if not text:
            problems.append(f"{name}: empty findings and impressions in {reports_csv.name}")
            continue
        item = {"image": str(volumes[name][version]), "text": text, "study": fields["scan"], "case_id": fields["stem"]}
        meta = metadata.loc[name] if metadata is not None and name in metadata.index else None
        if meta is not None:
            xy = _xy_spacing(meta.get("XYSpacing"))
            if xy is not None and not pd.isna(meta.get("ZSpacing")):
                item["metadata_spacing_mm"] = [xy, xy, float(meta["ZSpacing"])]
        if version == "v1":
            if meta is None or pd.isna(meta.get("RescaleSlope")) or pd.isna(meta.get("RescaleIntercept")):
                problems.append(f"{name}: v1 volume without RescaleSlope/RescaleIntercept in the metadata table")
                continue
            item["rescale_slope"], item["rescale_intercept"] = float(meta["RescaleSlope"]), float(
                meta["RescaleIntercept"]
            )
        seg = seg_root / seg_pattern.format(**fields)
        if seg.resolve() in {Path(v).resolve() for v in volumes[name].values()}:
            problems.append(
                f"{name}: the mask path {seg} is the CT itself; set seg_dir to the TotalSegmentator "
                "output folder (and seg_pattern to its layout)"
            )
            continue
        if seg.is_file():
            item["seg"] = str(seg)
        else:
            missing_masks.append(str(seg))
        row = labels.loc[name] if labels is not None and name in labels.index else None
        item["labels"] = [float(row[f]) if row is not None and not pd.isna(row[f]) else float("nan") for f in FINDINGS]
        if name in region_sentences:
            item["region_sentences"] = region_sentences[name]
        if name in cot:
            item["cot"] = cot[name]
        items.append(item)
    if missing_masks:
        logger.warning(
            f"{root} [{section}]: {len(missing_masks)} of {len(volumes)} volumes have no TotalSegmentator mask "
            f"(first: {missing_masks[0]})"
            + ("; they train without region tokens" if missing_seg == "no_regions" else "")
        )
        if missing_seg == "error":
            problems += [f"missing mask {m}" for m in missing_masks]
    if problems:
        shown = "\n  ".join(problems[:20])
        raise ValueError(
            f"{root} [{section}]: {len(problems)} problem(s):\n  {shown}"
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    if tokenizer is not None:
        logger.info(
            f"{root} [{section}]: {shortened} of {len(items)} reports exceed {max_length} tokens; "
            "their findings were shortened to keep the impression whole"
        )
    return items
