"""3D patch embedding with a 3D positional embedding and a CLS token (ViT, arXiv:2010.11929, in 3D)."""

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

POS_EMBED_TYPES = ("learned", "sinusoidal")


def patch_grid_positions(grid: tuple[int, int, int], device: Optional[torch.device] = None) -> torch.Tensor:
    """Integer patch-grid indices ``(Z*Y*X, 3)`` of a ``(Z, Y, X)`` grid, row-major with ``x`` fastest.

    Row ``n`` is ``(z, y, x)`` of the ``n``-th patch token, the order in which `PatchEmbedding3D` flattens
    the grid.
    """
    axes = [
        torch.arange(grid[0], device=device),
        torch.arange(grid[1], device=device),
        torch.arange(grid[2], device=device),
    ]
    return torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).reshape(-1, 3)


def sinusoidal_table(length: int, dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed sine/cosine table ``(length, dim)`` over positions ``0..length-1`` (arXiv:1706.03762, sec. 3.5).

    Raises:
        ValueError: ``dim`` is odd.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding width must be even, got {dim}")
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angle = torch.arange(length, device=device, dtype=torch.float32)[:, None] * freq[None, :]  # (L, dim/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)  # (L, dim)


class PatchEmbedding3D(nn.Module):
    """Cut a CT volume into 3D patches, embed them and add a 3D positional embedding.

    A ``Conv3d`` with kernel = stride = ``patch_size`` embeds each patch; the positional embedding is the
    sum of one table per axis (factorised z/y/x). ``"learned"`` tables are sized for ``grid_size`` and
    linearly interpolated to any other grid; ``"sinusoidal"`` tables are fixed and computed for the grid
    at hand (the width is split into z, y and x parts). A learned CLS token is prepended; it carries no
    positional embedding.

    Args:
        in_channels: image channels (1 for CT).
        embed_dim: token width ``C``.
        patch_size: ``(pz, py, px)`` voxels per patch, slice axis first.
        grid_size: ``(Z, Y, X)`` patches of the nominal input (input size // patch size).
        pos_embed_type: ``"learned"`` or ``"sinusoidal"``.

    Shapes:
        ``forward(image (B, in_channels, D, H, W)) -> (tokens (B, 1 + N, C), grid (Z, Y, X))`` with
        ``N = Z * Y * X`` and ``Z = D / pz`` etc.

    Raises:
        ValueError: unknown ``pos_embed_type``; a sinusoidal ``embed_dim`` not divisible into three
            even parts; an input side that is not a multiple of the patch size.
    """

    def __init__(
        self,
        in_channels: int,
        embed_dim: int,
        patch_size: Sequence[int],
        grid_size: Sequence[int],
        pos_embed_type: str = "learned",
    ) -> None:
        super().__init__()
        if pos_embed_type not in POS_EMBED_TYPES:
            raise ValueError(f"pos_embed_type must be one of {POS_EMBED_TYPES}, got {pos_embed_type!r}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.grid_size = tuple(int(g) for g in grid_size)
        self.embed_dim = embed_dim
        self.pos_embed_type = pos_embed_type
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        # the sinusoidal width is split z | y | x; each part must be even for sine/cosine pairs
        part = 2 * (embed_dim // 6)
        self.sin_dims = (embed_dim - 2 * part, part, part)
        if pos_embed_type == "learned":
            self.pos_z = nn.Parameter(torch.randn(self.grid_size[0], embed_dim) * 0.02)
            self.pos_y = nn.Parameter(torch.randn(self.grid_size[1], embed_dim) * 0.02)
            self.pos_x = nn.Parameter(torch.randn(self.grid_size[2], embed_dim) * 0.02)
        else:
            if embed_dim % 2 or part == 0:
                raise ValueError(f"sinusoidal embedding needs an even embed_dim >= 6, got {embed_dim}")
            self.pos_z = self.pos_y = self.pos_x = None

    def _axis_tables(self, grid: tuple[int, int, int], device: torch.device) -> list[torch.Tensor]:
        """Per-axis tables ``[(Z, C), (Y, C), (X, C)]`` for the grid at hand."""
        tables: list[torch.Tensor] = []
        pos_z, pos_y, pos_x = self.pos_z, self.pos_y, self.pos_x
        if pos_z is None or pos_y is None or pos_x is None:  # sinusoidal
            start = 0
            for axis in range(3):
                length, width = grid[axis], self.sin_dims[axis]
                table = torch.zeros(length, self.embed_dim, device=device)
                table[:, start : start + width] = sinusoidal_table(length, width, device)
                tables.append(table)
                start += width
            return tables
        learned = [pos_z, pos_y, pos_x]
        for axis in range(3):
            table = learned[axis]
            if table.shape[0] != grid[axis]:
                # (L, C) -> (1, C, L) -> interpolate -> (length, C)
                table = F.interpolate(table.T[None], size=grid[axis], mode="linear", align_corners=False)[0].T
            tables.append(table)
        return tables

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        spatial = [image.shape[2], image.shape[3], image.shape[4]]
        if spatial[0] % self.patch_size[0] or spatial[1] % self.patch_size[1] or spatial[2] % self.patch_size[2]:
            raise ValueError(
                f"input size {spatial} (D, H, W) is not a multiple of the patch size {list(self.patch_size)}"
            )
        x = self.proj(image)  # (B, C, Z, Y, X)
        grid = (int(x.shape[2]), int(x.shape[3]), int(x.shape[4]))
        x = x.flatten(2).transpose(1, 2)  # (B, C, Z, Y, X) -> (B, N, C)
        tz, ty, tx = self._axis_tables(grid, x.device)
        pos = tz[:, None, None, :] + ty[None, :, None, :] + tx[None, None, :, :]  # (Z, Y, X, C)
        x = x + pos.reshape(1, -1, self.embed_dim).to(x.dtype)  # (1, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)  # (B, 1, C)
        return torch.cat([cls, x], dim=1), grid  # (B, 1 + N, C)
