"""Figures and NIfTI maps of the evaluation: slice-bias curves, ROC curves, recall-vs-K, maps on the CT.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas (no display, no pyplot
state) and saved as PNG.

Axis order. The network's patch grid is ``(Z, Y, X)`` = ``(D, H, W)``: the RAS-oriented volume
``(X, Y, Z)`` permuted by `scripts.data.ToSliceFirstd`, ``z`` growing towards superior. NIfTI and
MONAI arrays are ``(X, Y, Z)``. `patch_map_to_grid` upsamples a ``(Z, Y, X)`` map and permutes it to
``(X, Y, Z)`` once; `save_patch_map_nifti` then writes it on the reference CT's own storage grid and
affine, so 3D Slicer or MONAI Label overlays it on that CT.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from .metrics import DIRECTIONS


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).detach().cpu().numpy())


def plot_slice_bias(slice_bias: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Plot one block's learned slice-distance bias, one line per head, to a PNG.

    Args:
        slice_bias: ``(nh, S)`` table (`SliceAwareSelfAttention.slice_bias`, ``S = 32``): the logit bias
            added between tokens ``min(|z_i - z_j|, S - 1)`` patch rows apart.
        path: output PNG.

    Returns:
        ``path``.

    Raises:
        ValueError: the table is not 2-D.
    """
    table = _numpy(slice_bias).astype(np.float64)
    if table.ndim != 2:
        raise ValueError(f"slice bias must be a (heads, distances) table, got shape {table.shape}")
    heads, buckets = table.shape
    fig = _figure((7, 4))
    ax = fig.add_subplot()
    colors = colormaps["tab20"](np.arange(heads) % 20)
    for h in range(heads):
        ax.plot(
            np.arange(buckets),
            table[h],
            marker=".",
            color=colors[h],
            linestyle="-" if h < 20 else "--",
            label=f"head {h}",
        )
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"slice distance |z_i - z_j| in patch rows (last bin: {buckets - 1} or more)")
    ax.set_ylabel("attention logit bias")
    ax.set_title("Slice-distance bias per head")
    ax.legend(fontsize="x-small", ncol=max(1, heads // 6))
    return _save(fig, path)


def plot_roc_curves(
    probabilities: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    findings: Sequence[str],
    path: str | Path,
) -> dict:
    """ROC curve of every finding (one panel each, labelled cases only) in one PNG.

    Curves from `sklearn.metrics.roc_curve`, AUROC from `sklearn.metrics.roc_auc_score`; a finding with
    one class only gets an empty panel that says why.

    Args:
        probabilities: ``(M, K)`` probabilities of "present"; labels: ``(M, K)`` 0/1/NaN;
        findings: ``K`` names; path: output PNG.

    Returns:
        ``{finding: {"value": auroc | None, "reason"?}}``, the AUROC written in each panel.

    Raises:
        ValueError: shapes differ from ``(M, K)``.
    """
    probs, labs = _numpy(probabilities).astype(np.float64), _numpy(labels).astype(np.float64)
    if probs.shape != labs.shape or probs.ndim != 2 or probs.shape[1] != len(findings):
        raise ValueError(f"probabilities {probs.shape} and labels {labs.shape} must be (M, {len(findings)})")
    cols = min(6, len(findings))
    rows = -(-len(findings) // cols)
    fig = _figure((2.6 * cols, 2.6 * rows))
    out = {}
    for j, finding in enumerate(findings):
        ax = fig.add_subplot(rows, cols, j + 1)
        mask = ~np.isnan(labs[:, j])
        y, p = labs[mask, j], probs[mask, j]
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        if y.size == 0 or y.min() == y.max():
            reason = "no labels" if y.size == 0 else ("only negative cases" if y.max() == 0 else "only positive cases")
            out[finding] = {"value": None, "reason": reason}
            ax.text(0.5, 0.5, f"AUROC undefined:\n{reason}", ha="center", va="center", fontsize="small")
        else:
            fpr, tpr, _ = roc_curve(y, p)
            out[finding] = {"value": float(roc_auc_score(y, p))}
            ax.plot(fpr, tpr, linewidth=1.5)
            note = f"AUROC {out[finding]['value']:.3f}\nn={y.size}, pos={int(y.sum())}"
            ax.text(0.95, 0.05, note, ha="right", va="bottom", fontsize="x-small")
        ax.set_title(finding, fontsize="small")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize="x-small")
        if j % cols == 0:
            ax.set_ylabel("sensitivity", fontsize="small")
        if j >= len(findings) - cols:
            ax.set_xlabel("1 - specificity", fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    return out


def plot_recall_at_k(report: Mapping, path: str | Path) -> Path:
    """Recall-vs-K curves of both retrieval directions, with the chance level, to a PNG.

    Args:
        report: the dict of `scripts.metrics.retrieval_metrics` (its ``"recall_curve"`` entries).
        path: output PNG.

    Raises:
        ValueError: the report has no recall curve.
    """
    if not all(d in report and "recall_curve" in report[d] for d in DIRECTIONS):
        raise ValueError(f"expected a retrieval_metrics report with {DIRECTIONS}, got keys {sorted(report)}")
    fig = _figure((6, 4))
    ax = fig.add_subplot()
    for direction, color in zip(DIRECTIONS, ("tab:blue", "tab:orange")):
        curve = report[direction]["recall_curve"]
        name = direction.replace("_", " ")
        ax.plot(curve["k"], curve["recall"], color=color, label=name)
        ax.plot(curve["k"], curve["chance"], color=color, linestyle=":", label=f"{name}, chance")
    ax.set_xscale("log")
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_ylim(0, 1.02)
    protocol = report.get("protocol", {})
    ax.set_title(f"Retrieval, pool of {protocol.get('pool_size', '?')} ({protocol.get('tie_mode', '?')} ties)")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def patch_map_to_grid(patch_map: torch.Tensor | np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
    """Upsample a patch-grid map ``(Z, Y, X)`` to a RAS voxel grid and return it as ``(X, Y, Z)``.

    Trilinear interpolation (`torch.nn.functional.interpolate`, ``align_corners=False``: each patch
    value sits at its patch's centre, so a patch covers exactly its own voxels when the grid is a
    multiple of the patch size, as the network's input is).

    Args:
        patch_map: ``(Z, Y, X)`` values on the patch grid.
        spatial_shape: ``(X, Y, Z)`` voxels of the RAS-oriented volume the network saw.

    Returns:
        ``(X, Y, Z)`` float32 array.

    Raises:
        ValueError: the map is not 3-D or ``spatial_shape`` does not have three sides.
    """
    grid = torch.as_tensor(patch_map).detach().float().cpu()
    if grid.ndim != 3 or len(spatial_shape) != 3:
        raise ValueError(
            f"patch map must be (Z, Y, X) and spatial_shape (X, Y, Z), got {tuple(grid.shape)}, {tuple(spatial_shape)}"
        )
    x, y, z = (int(s) for s in spatial_shape)
    up = F.interpolate(grid[None, None], size=(z, y, x), mode="trilinear", align_corners=False)[0, 0]  # (Z', Y', X')
    return up.permute(2, 1, 0).contiguous().numpy()  # (Z, Y, X) -> (X, Y, Z)


def save_patch_map_nifti(
    patch_map: torch.Tensor | np.ndarray, reference: str | Path | torch.Tensor, path: str | Path
) -> Path:
    """Write a patch-grid map as a float32 NIfTI on the reference CT's grid, with its affine.

    The map belongs to the reference volume as the network saw it after RAS orientation, with no
    resampling or cropping in between (pass the transformed `MetaTensor` when the chain resampled or
    cropped). A file stored in another orientation (LPS, LAS) is handled: the map is upsampled on the
    RAS grid (`patch_map_to_grid`) and reoriented back to the file's storage order with nibabel, so the
    written image has the reference's shape and affine.

    Args:
        patch_map: ``(Z, Y, X)`` map, e.g. `scripts.metrics.text_patch_similarity`.
        reference: a NIfTI path, or a `monai.data.MetaTensor` ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) with
            an ``affine``.
        path: output ``.nii.gz``.

    Returns:
        ``path``.

    Raises:
        ValueError: the reference is not 3-D, or a tensor reference without an affine.
    """
    if isinstance(reference, (str, Path)):
        image = nib.load(str(reference))
        shape, affine, name = tuple(image.shape), np.asarray(image.affine, dtype=np.float64), str(reference)
    else:
        if not hasattr(reference, "affine"):
            raise ValueError("a tensor reference must be a MetaTensor with an affine")
        shape = tuple(reference.shape[1:] if reference.ndim == 4 else reference.shape)
        affine, name = np.asarray(torch.as_tensor(reference.affine).cpu().numpy(), dtype=np.float64), "<MetaTensor>"
    if len(shape) != 3:
        raise ValueError(f"{name}: reference must be a 3-D volume, got shape {shape}")
    storage = nib.orientations.io_orientation(affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    to_ras = nib.orientations.ornt_transform(storage, ras)  # row i: RAS axis of storage axis i, flip
    ras_shape = [0, 0, 0]
    for axis, (target, _) in enumerate(to_ras):
        ras_shape[int(target)] = shape[axis]
    volume = patch_map_to_grid(patch_map, ras_shape)  # (X, Y, Z) in RAS
    volume = nib.orientations.apply_orientation(volume, nib.orientations.ornt_transform(ras, storage))  # RAS -> storage
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(volume, dtype=np.float32), affine), str(path))
    return path


def _planes(volume: np.ndarray, peak: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal planes of a RAS ``(X, Y, Z)`` volume through ``peak``, displayed
    radiologically: patient right on the viewer's left, anterior / superior up, anterior left in sagittal."""
    x, y, z = peak
    axial = np.flip(volume[:, :, z].T, (0, 1))  # rows: y (anterior first), columns: x (right first)
    coronal = np.flip(volume[:, y, :].T, (0, 1))  # rows: z (superior first), columns: x (right first)
    sagittal = np.flip(volume[x, :, :].T, (0, 1))  # rows: z (superior first), columns: y (anterior first)
    return [axial, coronal, sagittal]


def save_overlay_png(
    ct: torch.Tensor | np.ndarray,
    heat: torch.Tensor | np.ndarray,
    path: str | Path,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> tuple[int, int, int]:
    """Overlay a map on the CT in the axial, coronal and sagittal planes through the map's peak (PNG).

    Radiological display: patient right on the viewer's left, anterior and superior up, anterior on the
    left of the sagittal plane; cyan lines cross at the peak; the lowest fifth of the map's range is
    left transparent.

    Args:
        ct: ``(X, Y, Z)`` RAS CT (HU or windowed; grey levels span its 1st to 99th percentile).
        heat: ``(X, Y, Z)`` map on the same grid (`patch_map_to_grid`).
        path: output PNG.
        spacing_mm: ``(x, y, z)`` voxel spacing, for the pixel aspect ratio.

    Returns:
        ``(x, y, z)`` voxel index of the peak (the first maximum in C order).

    Raises:
        ValueError: ``ct`` and ``heat`` are not one 3-D shape.
    """
    image, overlay = _numpy(ct).astype(np.float32), _numpy(heat).astype(np.float32)
    if image.shape != overlay.shape or image.ndim != 3:
        raise ValueError(f"ct {image.shape} and heat {overlay.shape} must be one (X, Y, Z) shape")
    peak = tuple(int(i) for i in np.unravel_index(int(np.argmax(overlay)), overlay.shape))
    sx, sy, sz = (float(s) for s in spacing_mm)
    nx, ny, nz = image.shape
    px, py, pz = peak
    vmin, vmax = np.percentile(image, [1, 99])
    hmin, hmax = float(overlay.min()), float(overlay.max())
    # per plane: title, pixel aspect (row / column spacing), peak as (column, row), edge letters (left, right)
    layout = [
        ("axial", sy / sx, (nx - 1 - px, ny - 1 - py), ("R", "L")),
        ("coronal", sz / sx, (nx - 1 - px, nz - 1 - pz), ("R", "L")),
        ("sagittal", sz / sy, (ny - 1 - py, nz - 1 - pz), ("A", "P")),
    ]
    fig = _figure((12, 4.4))
    planes = zip(_planes(image, peak), _planes(overlay, peak), layout)
    for i, (ct_plane, heat_plane, (title, aspect, (col, row), letters)) in enumerate(planes):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.imshow(ct_plane, cmap="gray", vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        faint = heat_plane < hmin + 0.2 * (hmax - hmin)  # the lowest fifth of the range stays transparent
        shown = ax.imshow(
            np.ma.masked_where(faint, heat_plane),
            cmap="jet",
            alpha=0.5,
            vmin=hmin,
            vmax=hmax,
            aspect=aspect,
            interpolation="nearest",
        )
        ax.axhline(row, color="cyan", linewidth=0.6)
        ax.axvline(col, color="cyan", linewidth=0.6)
        ax.text(0.01, 0.5, letters[0], transform=ax.transAxes, color="yellow", fontsize="small", va="center")
        ax.text(0.97, 0.5, letters[1], transform=ax.transAxes, color="yellow", fontsize="small", va="center")
        ax.set_title(f"{title} through peak {peak}", fontsize="small")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=fig.axes, fraction=0.02)
    _save(fig, path)
    return peak
