"""Anatomy encoder: a TotalSegmentator label map -> soft patch-to-region assignment and region tokens."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SLAB_VOXELS = 1 << 22  # voxels of label map per counting pass (32 MB of int64)


class AnatomyEncoder(nn.Module):
    """Turn a TotalSegmentator v2 label map into per-patch region fractions and region tokens.

    The label map is remapped to ``R + 1`` classes (0 background, regions ``1..R``) through a lookup
    table; each patch's assignment is the fraction of its voxels in each class, counted with a
    scatter-add over the patch's voxels (never a one-hot of the 118 TotalSegmentator classes).
    Region tokens are ``region_embedding[r] + sum_n w[n, r] x[n] / max(sum_n w[n, r], eps)``: the
    assignment-weighted mean of patch features plus a learned embedding of the region's identity.
    An absent region has all weights 0, so its token is its embedding alone, never NaN.

    The lookup table is a persistent buffer, so a checkpoint carries the region map it was trained with.

    Args:
        region_class_ids: ``R`` lists of TotalSegmentator v2 label ids, one per region (from
            `scripts.anatomy_regions.load_region_map`).
        embed_dim: token width ``C``.
        patch_size: ``(pz, py, px)`` voxels per patch, slice axis first.
        num_classes: size of the label-id space (118 for TotalSegmentator v2: ids 0..117). Ids outside
            ``[0, num_classes)`` count as background.

    Raises:
        ValueError: a label id outside ``[1, num_classes)`` in ``region_class_ids``, or listed twice.
    """

    def __init__(
        self,
        region_class_ids: Sequence[Sequence[int]],
        embed_dim: int,
        patch_size: Sequence[int],
        num_classes: int = 118,
    ) -> None:
        super().__init__()
        lookup = [0] * num_classes
        for region, ids in enumerate(region_class_ids, start=1):
            for label_id in ids:
                if not 0 < int(label_id) < num_classes:
                    raise ValueError(f"region {region}: label id {label_id} is outside [1, {num_classes})")
                if lookup[int(label_id)] != 0:
                    raise ValueError(f"label id {label_id} is in regions {lookup[int(label_id)]} and {region}")
                lookup[int(label_id)] = region
        self.register_buffer("class_to_region", torch.tensor(lookup, dtype=torch.long))
        self.num_regions = len(region_class_ids)
        self.slab_voxels = SLAB_VOXELS
        self.patch_size = tuple(int(p) for p in patch_size)
        self.region_embedding = nn.Parameter(torch.randn(self.num_regions, embed_dim) * 0.02)

    def assign(self, label_map: torch.Tensor) -> dict[str, torch.Tensor]:
        """Soft patch-to-region assignment of a label map.

        The label ids of each patch are counted with one `torch.bincount` per slab of patch rows (at
        most ``slab_voxels`` voxels, so the integer copies of the label map stay small), then summed into
        regions through the id-to-region lookup: a few passes over the voxels, no per-voxel lookup.

        Args:
            label_map: ``(B, 1, D, H, W)`` TotalSegmentator v2 label ids (any dtype; rounded).

        Returns:
            ``patch_to_region (B, N, R)``: fraction of each patch's voxels in each region;
            ``background_fraction (B, N)``: the rest, so ``[patch_to_region, background_fraction]`` rows
            sum to 1; ``region_present (B, R)``: regions with at least one voxel.
        """
        b, d, h, w = label_map.shape[0], label_map.shape[2], label_map.shape[3], label_map.shape[4]
        pz, py, px = self.patch_size
        ny, nx = h // py, w // px
        num_ids = self.class_to_region.numel() + 2  # ids -1 .. num_classes: the two ends catch ids outside the map
        device = label_map.device
        plane = (torch.arange(h, device=device) // py)[:, None] * nx + (torch.arange(w, device=device) // px)[None]
        rows_per_slab = max(1, self.slab_voxels // (b * pz * h * w))
        slabs: list[torch.Tensor] = []
        for z0 in range(0, d // pz, rows_per_slab):
            rows = min(rows_per_slab, d // pz - z0)
            ids = (label_map[:, 0, z0 * pz : (z0 + rows) * pz] + 0.5).long()  # rounded ids (B, rows * pz, H, W)
            # bin of each voxel: (batch item, patch row in the slab, patch in the plane, id + 1)
            item_row = torch.arange(b * rows, device=device).view(b, rows, 1, 1, 1) * (ny * nx)
            bins = (item_row + plane) * num_ids + 1  # (B, rows, 1, H, W)
            ids = ids.clamp_(-1, num_ids - 2).view(b, rows, pz, h, w) + bins  # (B, rows, pz, H, W)
            counts = torch.bincount(ids.flatten(), minlength=b * rows * ny * nx * num_ids)
            # (B, rows, Y*X, ids) in the token order (z slowest)
            slabs.append(counts.view(b, rows * ny * nx, num_ids))
        id_counts = torch.cat(slabs, dim=1).float()  # (B, N, ids)
        lookup = F.one_hot(F.pad(self.class_to_region, [1, 1]), self.num_regions + 1).float()  # (ids, R + 1)
        counts = id_counts @ lookup  # (B, N, R + 1)
        fractions = counts / float(pz * py * px)
        return {
            "patch_to_region": fractions[..., 1:],
            "background_fraction": fractions[..., 0],
            "region_present": counts[..., 1:].sum(1) > 0,
        }

    def region_tokens(self, patches: torch.Tensor, patch_to_region: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """Region tokens ``(B, R, C)`` from patch features ``(B, N, C)`` and assignment ``(B, N, R)``."""
        weights = patch_to_region.to(patches.dtype)
        pooled = torch.einsum("bnr,bnc->brc", weights, patches)  # (B, R, C)
        mass = weights.sum(1).clamp_min(eps)[..., None]  # (B, R, 1)
        return self.region_embedding.to(patches.dtype)[None] + pooled / mass
