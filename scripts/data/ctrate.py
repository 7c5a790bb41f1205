"""CT-RATE as downloaded: volumes, reports, metadata and abnormality labels joined into a datalist.

CT-RATE (Hamamci et al., arXiv:2403.17834; https://huggingface.co/datasets/ibrahimhamamci/CT-RATE)
ships, under one root (any depth):

- volumes ``{train,valid}/<patient>/<scan>/<volume>.nii.gz`` (v1, raw values: the DICOM rescale is in the
  metadata table) and ``{train,valid}_fixed/...`` (v2, already in HU), named
  ``train_12_a_2.nii.gz`` = split ``train``, patient ``train_12``, scan ``train_12_a``, reconstruction 2;
- ``train_reports.csv`` / ``validation_reports.csv``: ``VolumeName, ClinicalInformation_EN, Technique_EN,
  Findings_EN, Impressions_EN``;
- ``train_metadata.csv`` / ``validation_metadata.csv``: ``VolumeName``, ``RescaleSlope``,
  ``RescaleIntercept``, ``XYSpacing`` (``"[0.7, 0.7]"``), ``ZSpacing``, ``ImageOrientationPatient``
  (``"[1, 0, 0, 0, 1, 0]"``), ``ImagePositionPatient`` among others. The v1 volumes' headers are blank
  (identity affine): for them this table is the geometry; the v2 headers were rebuilt from it;
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


def _index_volumes(root: Path, split: str, exclude: Path | None) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """VolumeName -> {"v1": path, "v2": path} for the volumes of one split, and the names found twice.

    Files below ``exclude`` (the mask folder, when it lies inside the download) are never taken for CTs.
    """
    found: dict[str, dict[str, Path]] = {}
    twice = []
    for folder, version in ((split, "v1"), (f"{split}_fixed", "v2")):
        for path in sorted(root.rglob(f"{folder}/*/*/*.nii.gz")):
            if exclude is not None and path.resolve().is_relative_to(exclude):
                continue
            if version in found.get(path.name, {}):
                twice.append(f"{path.name}: two {version} copies, {found[path.name][version]} and {path}")
            found.setdefault(path.name, {})[version] = path
    return found, twice


def _parse_list(value, length: int) -> list[float] | None:
    """A CT-RATE list cell (``"[0.75, 0.75]"``, or a bare number for length 1) as floats; ``None`` when
    missing. Raises ``ValueError`` for a cell of another length."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    parsed = ast.literal_eval(value) if isinstance(value, str) else value
    values = [float(v) for v in (parsed if isinstance(parsed, (list, tuple)) else [parsed])]
    if len(values) != length:
        raise ValueError(f"expected {length} values, got {value!r}")
    return values


def _table_geometry(meta, version: str) -> dict:
    """The metadata table's geometry of one volume, for `scripts.data.ResolveGeometryd` (``source``: which wins)."""
    geometry = {"source": "table" if version == "v1" else "header", "spacing_mm": None}
    geometry["orientation"] = geometry["position"] = None
    if meta is None:
        return geometry
    xy, z = _parse_list(meta.get("XYSpacing"), 2), _parse_list(meta.get("ZSpacing"), 1)
    if xy is not None and z is not None:
        geometry["spacing_mm"] = [xy[0], xy[1], z[0]]
    geometry["orientation"] = _parse_list(meta.get("ImageOrientationPatient"), 6)
    geometry["position"] = _parse_list(meta.get("ImagePositionPatient"), 3)
    return geometry


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


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
    when unknown), ``table_geometry`` (the metadata table's spacing, orientation and position, and which
    source wins: the table for v1, the header for v2; see `scripts.data.ResolveGeometryd`),
    ``rescale_slope`` and ``rescale_intercept`` (v1 volumes only), and when available
    ``region_sentences`` (RadGenome) and ``cot``. The keys only preprocessing needs (``table_geometry``,
    ``rescale_*``) are dropped by the load chain before the cache.

    Logged per split: table rows without a volume on disk (a partial download) and volumes without a
    report row (skipped: no text to pair with), each with a count and the first names.

    Args:
        dataset_dir: the CT-RATE root.
        section: ``"training"`` (CT-RATE ``train``) or ``"validation"`` (``valid``).
        seg_dir: root of the TotalSegmentator masks; ``None`` = ``dataset_dir``. Files below it are never
            taken for CT volumes, even when it lies inside ``dataset_dir``.
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
        ValueError: unknown section or option; no volumes; a volume found twice; v1 volumes without
            rescale or spacing metadata; malformed geometry cells; a mask path that is the CT itself; or
            (with ``missing_seg="error"``) volumes without a mask: listed by name.
    """
    if section not in SPLITS:
        raise ValueError(f"section must be one of {tuple(SPLITS)}, got {section!r}")
    if missing_seg not in ("error", "no_regions") or volume_version not in ("v1", "v2"):
        raise ValueError(
            f"missing_seg must be 'error'/'no_regions' and volume_version 'v1'/'v2', got {missing_seg!r}, {volume_version!r}"
        )
    root, split = Path(dataset_dir), SPLITS[section]
    seg_root = Path(seg_dir) if seg_dir is not None else root
    exclude = seg_root.resolve() if not root.resolve().is_relative_to(seg_root.resolve()) else None
    volumes, twice = _index_volumes(root, split, exclude)
    if not volumes:
        raise ValueError(
            f"{root}: no CT-RATE volumes under {split}/ or {split}_fixed/ (<patient>/<scan>/<volume>.nii.gz)"
            + (f" outside the mask folder {seg_root}" if exclude is not None else "")
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

    no_volume = set(reports.index) - set(volumes)
    if no_volume:
        logger.warning(
            f"{root} [{section}]: {len(no_volume)} of {len(reports)} rows of {reports_csv.name} have no volume on "
            f"disk (a partial download?); first: {_first(no_volume)}"
        )
    no_row = set(volumes) - set(reports.index)
    if no_row:
        logger.warning(
            f"{root} [{section}]: {len(no_row)} of {len(volumes)} volumes have no row in {reports_csv.name} and are "
            f"skipped (no report to pair with); first: {_first(no_row)}"
        )
    items, problems, missing_masks, shortened = [], list(twice), [], 0
    for name in sorted(set(volumes) - no_row):
        fields = parse_volume_name(name)
        version = volume_version if volume_version in volumes[name] else next(iter(volumes[name]))
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
        try:
            item["table_geometry"] = _table_geometry(meta, version)
        except (ValueError, SyntaxError) as err:
            problems.append(f"{name}: malformed geometry in {metadata_csv.name}: {err}")
            continue
        if version == "v1":
            if meta is None or pd.isna(meta.get("RescaleSlope")) or pd.isna(meta.get("RescaleIntercept")):
                problems.append(f"{name}: v1 volume without RescaleSlope/RescaleIntercept in the metadata table")
                continue
            if item["table_geometry"]["spacing_mm"] is None:
                problems.append(
                    f"{name}: v1 volume (blank header) without XYSpacing/ZSpacing in the metadata table: no geometry"
                )
                continue
            item["rescale_slope"], item["rescale_intercept"] = float(meta["RescaleSlope"]), float(
                meta["RescaleIntercept"]
            )
        seg = seg_root / seg_pattern.format(**fields)
        if seg.resolve() in {Path(v).resolve() for v in volumes[name].values()}:
            problems.append(
                f"{name}: seg_dir {seg_root} with seg_pattern {seg_pattern!r} gives {seg}, which is this CT volume, "
                "not a mask: set seg_dir to the folder of the TotalSegmentator outputs (and seg_pattern to its layout)"
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
    logger.info(f"{root} [{section}]: {len(items)} cases from {len(volumes)} volumes and {len(reports)} report rows")
    if tokenizer is not None:
        logger.info(
            f"{root} [{section}]: {shortened} of {len(items)} reports exceed {max_length} tokens; "
            "their findings were shortened to keep the impression whole"
        )
    return items
