"""Pre-norm transformer block: slice-aware self-attention, region cross-attention, MLP."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .region_attention import RegionCrossAttention
from .slice_attention import SliceAwareSelfAttention

BLOCK_TYPES = ("anatomy", "plain")


class TransformerBlock(nn.Module):
    """One pre-norm encoder block (arXiv:2010.11929 layout, residual around each sub-layer).

    ``"anatomy"`` blocks run slice-aware self-attention, then region-aware cross-attention of the patch
    tokens to the region tokens, then the MLP. ``"plain"`` blocks are a ViT block (self-attention
    without slice bias, MLP) and build no cross-attention or bias weights: the ablation baseline.

    Args:
        embed_dim: token width ``C``.
        num_heads: heads ``nh``.
        mlp_ratio: MLP hidden width / ``C``.
        block_type: ``"anatomy"`` or ``"plain"``.
        attention_impl: self-attention path, ``"fused"``, ``"reference"`` or ``"flex"`` (see `slice_attention`).
        num_slice_buckets: length of the slice-distance bias table.

    Shapes:
        ``forward(x (B, 1 + N, C), token_slices (1 + N,), num_slice_rows, regions (B, R, C) | None,
        patch_to_region (B, N, R) | None) -> (B, 1 + N, C)``; token 0 is the CLS token, which takes no
        part in the cross-attention; ``token_slices`` as in `SliceAwareSelfAttention`. ``regions`` and
        ``patch_to_region`` are needed by anatomy blocks only.

    Raises:
        ValueError: unknown ``block_type``; an anatomy block called without ``regions`` or
            ``patch_to_region``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        block_type: str = "anatomy",
        attention_impl: str = "fused",
        num_slice_buckets: int = 32,
    ) -> None:
        super().__init__()
        if block_type not in BLOCK_TYPES:
            raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
        anatomy = block_type == "anatomy"
        self.norm_attn = nn.LayerNorm(embed_dim)
        self.attn = SliceAwareSelfAttention(
            embed_dim, num_heads, num_slice_buckets, attention_impl=attention_impl, use_slice_bias=anatomy
        )
        self.norm_patches = nn.LayerNorm(embed_dim) if anatomy else None
        self.norm_regions = nn.LayerNorm(embed_dim) if anatomy else None
        self.cross = RegionCrossAttention(embed_dim, num_heads) if anatomy else None
        self.uses_regions = anatomy
        hidden = int(embed_dim * mlp_ratio)
        self.norm_mlp = nn.LayerNorm(embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(
        self,
        x: torch.Tensor,
        token_slices: torch.Tensor,
        num_slice_rows: int,
        regions: Optional[torch.Tensor] = None,
        patch_to_region: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), token_slices, num_slice_rows)
        if self.cross is not None:
            if regions is None or patch_to_region is None:
                raise ValueError("an anatomy block needs regions (B, R, C) and patch_to_region (B, N, R)")
            x = x + self._region_update(x, regions, patch_to_region)
        return x + self.mlp(self.norm_mlp(x))

    def _region_update(self, x: torch.Tensor, regions: torch.Tensor, patch_to_region: torch.Tensor) -> torch.Tensor:
        """Cross-attention update ``(B, 1 + N, C)`` of the patch tokens, zero in the CLS row.

        A method of its own so that its temporaries are freed before the MLP runs.
        """
        update = self.cross(self.norm_patches(x[:, 1:]), self.norm_regions(regions), patch_to_region)  # (B, N, C)
        return F.pad(update, [0, 0, 1, 0])  # (B, 1 + N, C)
