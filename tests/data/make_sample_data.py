"""Rebuild the bundled sample (tests/data/sample) from the real CTs of the TotalSegmentator repository.

Run from the bundle root, with SimpleITK installed for the DICOM series (it is not a bundle requirement):

    python tests/data/make_sample_data.py --source ../shared/data/totalsegmentator

What it does (see tests/data/README.md for provenance and licenses):

1. Loads three real CTs with their TotalSegmentator v2 label maps, keeping their storage orientation:
   the abdomen-pelvis CT (RAS, 3 mm), the chest CTA crop (LPS, decimated by 2 to 3 mm) and the
   upper-abdomen DICOM series (read with SimpleITK, LPS, decimated by 4 in-plane to 3.9 mm; its mask
   is stored LAS, decimated on the matching rows). Decimation keeps every second voxel (no
   anti-aliasing), so image and mask stay on one world grid.
2. Cuts boxes of ``BOX_MM`` (x, y, z) at random positions in world coordinates and saves each crop as
   int16 CT + uint8 mask, in the source's orientation.
3. Writes each crop's text from its own mask: one sentence per region of configs/regions.json that
   fills at least ``MIN_FRACTION`` of the crop, largest first, with a coarse extent, and a matching
   chain of thought ("Step 1: ..."). The text is written for this project, not a report.
4. Writes datalist.json: the abdomen and chest crops train; the DICOM-series crops (another patient)
   validate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from scripts.anatomy_regions import load_region_map  # noqa: E402

BOX_MM = np.array([128.0, 128.0, 48.0])  # x, y, z: the demo input (12, 32, 32) voxels at 4 mm
MIN_FRACTION = 0.005
CROPS = {"abdomen": 60, "chest_cta": 6, "upper_abdomen_dicom": 20}
SPLIT = {"abdomen": "training", "chest_cta": "training", "upper_abdomen_dicom": "validation"}


def load_sources(source: Path, decimate: bool = True) -> dict[str, tuple[nib.Nifti1Image, nib.Nifti1Image]]:
    import SimpleITK as sitk  # noqa: N813 (the library's own short name)

    abdomen = (
        nib.load(source / "abdomen_ct/example_ct.nii.gz"),
        nib.load(source / "abdomen_ct/example_seg_fast_force_split.nii.gz"),
    )
    chest_ct = nib.load(source / "chest_cta_crop/ct_cropped.nii.gz")
    chest_seg = nib.load(source / "chest_cta_crop/ct_cropped_total_roi_subset_multilabel.nii.gz")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source / "dicom_series/example_ct_dicom")))
    tmp = ROOT / "tests/data/_dicom_series.nii.gz"
    sitk.WriteImage(reader.Execute(), str(tmp))
    dicom_ct = nib.load(tmp)
    dicom_ct = nib.Nifti1Image(np.asanyarray(dicom_ct.dataobj), dicom_ct.affine)  # detach from the temp file
    tmp.unlink()
    dicom_seg = nib.load(source / "dicom_series/example_seg_dicom.nii.gz")
    if not decimate:
        return {"abdomen": abdomen, "chest_cta": (chest_ct, chest_seg), "upper_abdomen_dicom": (dicom_ct, dicom_seg)}
    return {
        "abdomen": abdomen,
        "chest_cta": (chest_ct.slicer[::2, ::2, ::2], chest_seg.slicer[::2, ::2, ::2]),
        # the mask's rows run the other way (LAS vs LPS): mask row 511 - j is image row j
        "upper_abdomen_dicom": (dicom_ct.slicer[::4, ::4, :], dicom_seg.slicer[::4, 3::4, :]),
    }


def world_box_slices(img: nib.Nifti1Image, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...]:
    """Voxel slices of ``img`` whose centres lie in the world box [lo, hi] (RAS mm)."""
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (np.linalg.inv(img.affine) @ corners.T)[:3]
    start = np.clip(np.ceil(ijk.min(1) - 1e-6).astype(int), 0, img.shape)
    stop = np.clip(np.floor(ijk.max(1) + 1e-6).astype(int) + 1, 0, img.shape)
    return tuple(slice(a, b) for a, b in zip(start, stop))


def world_extent(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, img.shape[0] - 1) for j in (0, img.shape[1] - 1) for k in (0, img.shape[2] - 1)]
    )
    xyz = (img.affine @ corners.T)[:3]
    return xyz.min(1), xyz.max(1)


EXTENTS = ((0.4, "most of the view"), (0.15, "a large part"), (0.03, "a small part"), (0.0, "at the edge"))


def describe(regions: np.ndarray, labels: tuple[str, ...]) -> tuple[tuple[int, ...], str, str]:
    """``(regions shown, text, chain of thought)`` of a crop from its region map (0 background, 1..R).

    The text has one sentence per region filling at least ``MIN_FRACTION`` of the crop, largest first,
    with a coarse extent ("Liver and gallbladder: most of the view."); the chain of thought walks
    the same regions as "Step N:" lines.
    """
    fractions = np.bincount(regions.ravel(), minlength=len(labels) + 1)[1:] / regions.size
    shown = tuple(int(r) for r in np.argsort(-fractions, kind="stable") if fractions[r] >= MIN_FRACTION)
    if not shown:
        return shown, "No segmented structure is in view.", "Step 1: No segmented structure is in view."
    sentences = [f"{labels[r].capitalize()}: {next(t for lo, t in EXTENTS if fractions[r] >= lo)}." for r in shown]
    steps = [f"Step 1: The largest structure in view is the {labels[shown[0]]}."]
    steps += [f"Step {i}: The {labels[r]} is also in view." for i, r in enumerate(shown[1:], start=2)]
    return shown, " ".join(sentences), " ".join(steps)


def save(array: np.ndarray, affine: np.ndarray, path: Path, dtype, limit: bool = True) -> None:
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    if limit and path.stat().st_size >= 1_000_000:
        raise RuntimeError(f"{path} is {path.stat().st_size} bytes, over the Model Zoo's 1 MB limit")


def write_full_volumes(sources: dict, out: Path) -> None:
    """The whole source CTs and masks at their native resolution, with a datalist, for benchmarks."""
    items = []
    for name, (ct, seg) in sources.items():
        save(np.asanyarray(ct.dataobj), ct.affine, out / f"ct/{name}.nii.gz", np.int16, limit=False)
        save(np.asanyarray(seg.dataobj), seg.affine, out / f"seg/{name}.nii.gz", np.uint8, limit=False)
        items.append(
            {"image": f"ct/{name}.nii.gz", "seg": f"seg/{name}.nii.gz", "text": f"Whole {name} CT.", "study": name}
        )
    (out / "datalist.json").write_text(json.dumps({"training": items, "validation": items}, indent=4) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared/data/totalsegmentator")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/data/sample")
    parser.add_argument("--seed", type=int, default=20261129)
    parser.add_argument(
        "--full-volumes",
        type=Path,
        default=None,
        help="instead of crops, write the three whole source CTs and masks with a datalist here "
        "(benchmark input; not committed, over 1 MB)",
    )
    args = parser.parse_args()
    if args.full_volumes is not None:
        write_full_volumes(load_sources(args.source, decimate=False), args.full_volumes)
        return
    region_map = load_region_map(ROOT / "configs/regions.json")
    lookup = np.zeros(118, dtype=np.uint8)
    for region, ids in enumerate(region_map.class_ids, start=1):
        lookup[list(ids)] = region
    rng = np.random.default_rng(args.seed)
    datalist: dict[str, list] = {"training": [], "validation": []}
    for name, (ct, seg) in load_sources(args.source).items():
        lo, hi = world_extent(ct)
        texts: set[tuple[int, ...]] = set()
        kept, tries = 0, 0
        while kept < CROPS[name] and tries < 5000:
            tries += 1
            start = lo + rng.random(3) * np.maximum(hi - lo - BOX_MM, 0)
            box_lo, box_hi = start, start + BOX_MM
            ct_crop = ct.slicer[world_box_slices(ct, box_lo, box_hi)]
            seg_crop = seg.slicer[world_box_slices(seg, box_lo, box_hi)]
            ct_ras = nib.as_closest_canonical(ct_crop)
            seg_ras = nib.as_closest_canonical(seg_crop)
            if ct_ras.shape != seg_ras.shape or not np.allclose(ct_ras.affine, seg_ras.affine, atol=1e-3):
                raise RuntimeError(f"{name}: image and mask crops left the common grid")
            regions = lookup[np.asanyarray(seg_crop.dataobj).astype(np.int64)]
            shown, text, cot = describe(regions, region_map.labels)
            # validation crops show distinct region lists within the volume; no almost empty crop
            if (SPLIT[name] == "validation" and shown in texts) or (regions > 0).mean() < 0.05:
                continue
            texts.add(shown)
            study = f"{name}_{kept:02d}"
            save(np.asanyarray(ct_crop.dataobj), ct_crop.affine, args.out / f"ct/{study}.nii.gz", np.int16)
            save(np.asanyarray(seg_crop.dataobj), seg_crop.affine, args.out / f"seg/{study}.nii.gz", np.uint8)
            datalist[SPLIT[name]].append(
                {"image": f"ct/{study}.nii.gz", "seg": f"seg/{study}.nii.gz", "text": text, "cot": cot, "study": study}
            )
            kept += 1
        print(f"{name}: {kept} crops after {tries} tries")
    datalist = {
        "description": "Crops of three real CTs (TotalSegmentator repository, Apache-2.0) with their "
        "TotalSegmentator v2 masks. Each text and chain of thought was written for this project from the "
        "crop's own mask (one sentence per region filling at least 0.5% of the crop, largest first); none is "
        "a clinical report. "
        "Built by tests/data/make_sample_data.py.",
        **datalist,
    }
    (args.out / "datalist.json").write_text(json.dumps(datalist, indent=4) + "\n")


if __name__ == "__main__":
    main()
