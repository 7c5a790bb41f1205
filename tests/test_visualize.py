"""Figures and NIfTI maps: axis order, geometry on a real CT stored LPS, and the PNG figures."""

from __future__ import annotations

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from scripts.metrics import retrieval_metrics
from scripts.networks.slice_attention import SliceAwareSelfAttention
from scripts.visualize import (
    patch_map_to_grid,
    plot_recall_at_k,
    plot_roc_curves,
    plot_slice_bias,
    save_overlay_png,
    save_patch_map_nifti,
)
from sklearn.metrics import roc_auc_score

LIVER = 5  # TotalSegmentator v2 "liver"
PATCH = (4, 4, 3)  # (pz, py, px) voxels: divides the (X, Y, Z) = (33, 32, 20) crop below


@pytest.fixture(scope="module")
def lps_case(sample_dir):
    """A validation crop stored LPS (CT) with its mask stored LAS, and a one-hot patch map inside the liver."""
    image = sample_dir / "ct/upper_abdomen_dicom_16.nii.gz"
    seg = nib.load(sample_dir / "seg/upper_abdomen_dicom_16.nii.gz")
    assert nib.aff2axcodes(nib.load(image).affine) == ("L", "P", "S") and nib.aff2axcodes(seg.affine) == ("L", "A", "S")
    ras_seg = np.asanyarray(nib.as_closest_canonical(seg).dataobj)  # (X, Y, Z) in RAS, as the network sees it
    pz, py, px = PATCH
    nx, ny, nz = ras_seg.shape
    blocks = (ras_seg == LIVER).reshape(nx // px, px, ny // py, py, nz // pz, pz).mean((1, 3, 5))  # (X, Y, Z) patches
    # a patch entirely inside the liver whose left-right and front-back mirror (an LPS/RAS mix-up) holds none
    candidates = (blocks == 1.0) & (blocks[::-1, ::-1, :] == 0.0)
    assert candidates.any()
    ix, iy, iz = np.argwhere(candidates)[0]
    grid = (nz // pz, ny // py, nx // px)  # (Z, Y, X)
    patch_map = torch.zeros(grid)
    patch_map[iz, iy, ix] = 1.0
    return {"image": image, "seg": seg, "patch_map": patch_map}


def _peak_label(saved: nib.Nifti1Image, seg: nib.Nifti1Image) -> int:
    """Label under the saved map's peak, found through world coordinates (the two files differ in storage)."""
    data = np.asanyarray(saved.dataobj)
    ijk = np.unravel_index(int(np.argmax(data)), data.shape)
    world = saved.affine @ np.append(ijk, 1.0)
    seg_ijk = np.rint(np.linalg.inv(seg.affine) @ world)[:3].astype(int)
    return int(np.asanyarray(seg.dataobj)[tuple(seg_ijk)])


def test_patch_map_to_grid_names_the_axes():
    patch_map = torch.zeros(2, 3, 4)  # (Z, Y, X)
    patch_map[1, 2, 3] = 1.0
    volume = patch_map_to_grid(patch_map, (8, 6, 4))  # (X, Y, Z), two voxels per patch on each side
    assert volume.shape == (8, 6, 4)
    x, y, z = np.unravel_index(int(volume.argmax()), volume.shape)
    assert 6 <= x < 8 and 4 <= y < 6 and 2 <= z < 4
    assert np.allclose(patch_map_to_grid(torch.full((2, 3, 4), 0.7), (8, 6, 4)), 0.7)


def test_saved_map_has_the_ct_grid_and_peaks_in_the_liver(lps_case, tmp_path):
    ct = nib.load(lps_case["image"])
    path = save_patch_map_nifti(lps_case["patch_map"], lps_case["image"], tmp_path / "map.nii.gz")
    saved = nib.load(path)
    assert saved.shape == ct.shape
    assert np.allclose(saved.affine, ct.affine, atol=1e-4)
    assert _peak_label(saved, lps_case["seg"]) == LIVER
    # without the reorientation (the map written in RAS order on the LPS grid) the peak misses the liver
    wrong = nib.Nifti1Image(patch_map_to_grid(lps_case["patch_map"], ct.shape), ct.affine)
    assert _peak_label(wrong, lps_case["seg"]) != LIVER


def test_saved_map_on_a_ras_metatensor(lps_case, tmp_path):
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    image = Compose([LoadImage(image_only=True), EnsureChannelFirst(), Orientation("RAS")])(str(lps_case["image"]))
    path = save_patch_map_nifti(lps_case["patch_map"], image, tmp_path / "map_ras.nii.gz")
    saved = nib.load(path)
    assert saved.shape == tuple(image.shape[1:])
    assert np.allclose(saved.affine, image.affine.numpy(), atol=1e-4)
    assert _peak_label(saved, lps_case["seg"]) == LIVER
    with pytest.raises(ValueError, match="MetaTensor"):
        save_patch_map_nifti(lps_case["patch_map"], torch.zeros(1, 4, 4, 4), tmp_path / "bad.nii.gz")


def test_overlay_png_through_the_peak(lps_case, tmp_path):
    ras = nib.as_closest_canonical(nib.load(lps_case["image"]))
    ct = np.asanyarray(ras.dataobj).astype(np.float32)
    heat = patch_map_to_grid(lps_case["patch_map"], ct.shape)
    peak = save_overlay_png(ct, heat, tmp_path / "overlay.png", spacing_mm=ras.header.get_zooms())
    assert peak == tuple(int(i) for i in np.unravel_index(int(heat.argmax()), heat.shape))
    png = matplotlib.image.imread(tmp_path / "overlay.png")
    assert png.ndim == 3 and png.shape[1] > 2 * png.shape[0] and png[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="one"):
        save_overlay_png(ct, heat[:-1], tmp_path / "bad.png")


def test_roc_figure_reports_sklearn_auroc(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((50, 3)) < 0.5).astype(float)
    probs = np.clip(0.3 * labels + 0.7 * rng.random((50, 3)), 0, 1)
    labels[:, 2] = 0.0
    labels[3, 0] = np.nan
    aurocs = plot_roc_curves(probs, labels, ["a", "b", "none"], tmp_path / "roc.png")
    mask = ~np.isnan(labels[:, 0])
    assert aurocs["a"]["value"] == pytest.approx(roc_auc_score(labels[mask, 0], probs[mask, 0]))
    assert aurocs["none"] == {"value": None, "reason": "only negative cases"}
    assert matplotlib.image.imread(tmp_path / "roc.png")[..., :3].std() > 0.05


def test_recall_and_slice_bias_figures(tmp_path):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(30, 8, generator=g)
    report = retrieval_metrics(image, image + 0.5 * torch.randn(30, 8, generator=g), torch.arange(30), ks=(1, 5, 10))
    png = matplotlib.image.imread(plot_recall_at_k(report, tmp_path / "recall.png"))
    assert png.shape[0] > 100 and png[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="retrieval_metrics"):
        plot_recall_at_k({"image_to_text": {}}, tmp_path / "bad.png")

    attention = SliceAwareSelfAttention(embed_dim=16, num_heads=4)
    with torch.no_grad():
        attention.slice_bias.copy_(-torch.arange(32.0)[None] * torch.arange(1, 5.0)[:, None] / 10)
    png = matplotlib.image.imread(plot_slice_bias(attention.slice_bias, tmp_path / "bias.png"))
    assert png.shape[1] > png.shape[0] and png[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="table"):
        plot_slice_bias(torch.zeros(32), tmp_path / "bad.png")
