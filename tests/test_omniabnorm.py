"""OmniAbnorm-CT-14K loader on a fixture in its published layout, made from a real sample CT."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImaged
from PIL import Image
from scripts.data import load_omniabnorm

LIVER, SPLEEN = 5, 1


@pytest.fixture(scope="module")
def omniabnorm_root(tmp_path_factory, sample_datalist, sample_dir):
    """One sample: five axial slices (key slice 0, context -2..2) of a real CT crop as JPEG, and two
    'abnormality' masks on the key slice (the liver and the spleen, with text written for this test)."""
    root = tmp_path_factory.mktemp("omniabnorm")
    item = max(
        sample_datalist["validation"],
        key=lambda it: np.isin(np.asanyarray(nib.load(sample_dir / it["seg"]).dataobj), [LIVER]).sum()
        * np.isin(np.asanyarray(nib.load(sample_dir / it["seg"]).dataobj), [SPLEEN]).sum(),
    )
    ct = np.asanyarray(nib.as_closest_canonical(nib.load(sample_dir / item["image"])).dataobj).astype(np.float32)
    seg = np.asanyarray(nib.as_closest_canonical(nib.load(sample_dir / item["seg"])).dataobj)
    key = int(np.argmax([(seg[..., z] == LIVER).sum() * (seg[..., z] == SPLEEN).sum() for z in range(seg.shape[-1])]))
    key = min(max(key, 2), seg.shape[-1] - 3)
    (root / "images/case1").mkdir(parents=True)
    (root / "masks/case1").mkdir(parents=True)
    for offset in range(-2, 3):
        pixels = np.clip((ct[..., key + offset] + 160) / 400 * 255, 0, 255).astype(np.uint8)  # abdomen window
        Image.fromarray(pixels.T).save(root / f"images/case1/{offset}.jpg", quality=95)
    for name, label in (("a1", LIVER), ("a2", SPLEEN)):
        Image.fromarray(((seg[..., key] == label).T * 255).astype(np.uint8)).save(
            root / f"masks/case1/{name}.jpeg", quality=95
        )
    index = {
        "case1": {
            "image": "images/case1",
            "mask": "masks/case1",
            "context": [-2, -1, 1, 2],
            "abnormality": [
                {
                    "id": "a1",
                    "group_id": 0,
                    "label": "Liver lesion (test)",
                    "description": "Test finding written for this fixture: liver.",
                },
                {"id": "a2", "group_id": 1, "label": "Splenic lesion (test)", "description": ""},
            ],
        }
    }
    (root / "index.json").write_text(json.dumps(index))
    return root, seg[..., key]


def test_items_per_abnormality_with_slices_masks_and_text(omniabnorm_root):
    root, key_labels = omniabnorm_root
    items = load_omniabnorm(root / "index.json")
    assert [it["abnormality_id"] for it in items] == ["a1", "a2"]
    assert items[0]["text"] == "Test finding written for this fixture: liver."
    assert items[1]["text"] == "Splenic lesion (test)"  # no description: the taxonomy label stands in
    assert [p.rsplit("/", 1)[1] for p in items[0]["image"]] == ["-2.jpg", "-1.jpg", "0.jpg", "1.jpg", "2.jpg"]
    assert items[0]["key_slice"] == 2
    loaded = LoadImaged(["image", "mask"], image_only=True)(items[0])
    assert tuple(loaded["image"].shape) == (5, *key_labels.shape)
    mask = np.asarray(loaded["mask"]) > 127
    # the mask marks the liver of the key slice (JPEG edges aside)
    assert abs(int(mask.sum()) - int((key_labels == LIVER).sum())) <= 0.05 * (key_labels == LIVER).sum()
    assert (mask & (key_labels == LIVER)).sum() > 0.9 * mask.sum()


def test_missing_files_are_listed(omniabnorm_root, tmp_path):
    root, _ = omniabnorm_root
    index = json.loads((root / "index.json").read_text())
    index["case2"] = {"image": "images/none", "mask": "masks/case1", "context": [-1], "abnormality": []}
    index["case1"]["abnormality"].append({"id": "a9", "label": "x", "description": "y"})
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as info:
        load_omniabnorm(tmp_path / "index.json", root=root)
    assert "case2: slices [-1, 0] missing" in str(info.value) and "case1: mask a9 missing" in str(info.value)
    with pytest.raises(FileNotFoundError):
        load_omniabnorm(tmp_path / "absent.json")
