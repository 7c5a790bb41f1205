"""Region-aware cross-attention: patch tokens attend to the region tokens of the anatomy they lie in."""

import torch
import torch.nn.functional as F
from torch import nn


class RegionCrossAttention(nn.Module):
    """Multi-head cross-attention from patches (queries) to region tokens (keys and values).

    The logits get ``log(patch_to_region + eps)``, so a patch attends to the regions its voxels belong
    to, in proportion to how much of the patch each covers. The output is gated by the patch's
    foreground fraction ``sum_r patch_to_region[n, r]``: a pure background patch (or every patch of an
    empty mask) gets exactly no update, and nothing produces NaN.

    The bias enters SDPA as a float mask ``(B, 1, N, R)``: linear in ``N`` (``R`` keys), so there is no
    ``T x T`` term to avoid. Folding it into extra query channels, as the slice bias is
    (`slice_attention.fold_bias_into_channels`), is exact too but copies the queries, and measured
    slower on the CPU; one path serves every ``attention_impl``.

    Args:
        embed_dim: token width ``C``.
        num_heads: heads ``nh``; ``C`` must be divisible by ``nh``.
        eps: floor inside the log of the assignment weights.

    Shapes:
        ``forward(patches (B, N, C), regions (B, R, C), patch_to_region (B, N, R)) -> (B, N, C)``.

    Raises:
        ValueError: ``C`` not divisible by ``nh``.
    """

    def __init__(self, embed_dim: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.eps = eps
        self.q = nn.Linear(embed_dim, embed_dim)
        self.kv = nn.Linear(embed_dim, 2 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, patches: torch.Tensor, regions: torch.Tensor, patch_to_region: torch.Tensor) -> torch.Tensor:
        b, n, c = patches.shape
        r = regions.shape[1]
        q = self.q(patches).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # -> (B, nh, N, hd)
        kv = self.kv(regions).view(b, r, 2, self.num_heads, self.head_dim)  # (B, R, 2C) -> (B, R, 2, nh, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 2 x (B, nh, R, hd)
        weights = patch_to_region.to(q.dtype)
        bias = torch.log(weights + self.eps)[:, None]  # (B, N, R) -> (B, 1, N, R)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)  # (B, nh, N, hd)
        out = self.proj(out.transpose(1, 2).reshape(b, n, c))  # -> (B, N, C)
        return out * weights.sum(-1, keepdim=True)  # gate: foreground fraction (B, N, 1)
