"""Slice-aware multi-head self-attention: a learnable bias per head and slice distance.

The logit between tokens ``i`` and ``j`` gets ``bias[h, min(|z_i - z_j|, S - 1)]``, where ``z`` is the
token's slice row on the patch grid and ``S = 32`` by default (a relative position bias along the slice
axis only, in the spirit of Shaw et al., arXiv:1803.02155, and Swin's bias table, arXiv:2103.14030).
The CLS token is exempt: its distance to every token is 0.

Two paths share one switch, ``attention_impl``:

- ``"reference"``: `torch.nn.functional.scaled_dot_product_attention` with the full ``(nh, T, T)`` bias
  as a float mask. It materialises ``T x T`` per head: the numerical ground truth, for small inputs.
- ``"flex"``: `torch.nn.attention.flex_attention`, compiled, with the bias as a ``score_mod``. The fused
  kernel never materialises ``T x T``; use it on CUDA and at the seed size (16,385 tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

ATTENTION_IMPLS = ("reference", "flex")

_compiled_flex_attention = None


def compiled_flex_attention():
    """The process-wide compiled `flex_attention` (compiled on first use, then cached by shape)."""
    global _compiled_flex_attention
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def slice_distance_index(token_slices: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Bias-table index ``(T, T)``: ``min(|z_i - z_j|, num_buckets - 1)``, 0 in the CLS row and column.

    Args:
        token_slices: ``(T,)`` slice row of each token on the patch grid, ``-1`` for the CLS token.
        num_buckets: the bias table's length ``S``.
    """
    dist = (token_slices[:, None] - token_slices[None, :]).abs().clamp(max=num_buckets - 1)  # (T, T)
    is_cls = token_slices < 0
    return dist.masked_fill(is_cls[:, None] | is_cls[None, :], 0)


class SliceAwareSelfAttention(nn.Module):
    """Multi-head self-attention with a learnable slice-distance bias.

    Args:
        embed_dim: token width ``C``.
        num_heads: heads ``nh``; ``C`` must be divisible by ``nh``.
        num_slice_buckets: length ``S`` of the per-head bias table ``(nh, S)``; distances of ``S - 1``
            patch rows or more share the last entry.
        attention_impl: ``"reference"`` (SDPA with an explicit bias) or ``"flex"`` (compiled
            FlexAttention); see the module docstring.
        use_slice_bias: ``False`` builds a plain ViT self-attention (no bias table), the ablation baseline.

    Shapes:
        ``forward(x (B, T, C), token_slices (T,)) -> (B, T, C)``.

    Raises:
        ValueError: ``C`` not divisible by ``nh``, or an unknown ``attention_impl``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_slice_buckets: int = 32,
        attention_impl: str = "reference",
        use_slice_bias: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.num_slice_buckets = num_slice_buckets
        self.attention_impl = attention_impl
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.slice_bias = nn.Parameter(torch.zeros(num_heads, num_slice_buckets)) if use_slice_bias else None

    def forward(self, x: torch.Tensor, token_slices: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim)  # (B, T, 3C) -> (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x (B, nh, T, hd)
        if self.attention_impl == "flex":
            out = compiled_flex_attention()(q, k, v, score_mod=self._score_mod(token_slices))
        else:
            bias = None
            if self.slice_bias is not None:
                index = slice_distance_index(token_slices, self.num_slice_buckets)  # (T, T)
                bias = self.slice_bias[:, index].to(q.dtype)[None]  # (1, nh, T, T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, t, c)  # (B, nh, T, hd) -> (B, T, C)
        return self.proj(out)

    def _score_mod(self, token_slices: torch.Tensor):
        """FlexAttention ``score_mod`` adding the slice bias, or ``None`` without one."""
        if self.slice_bias is None:
            return None
        table, last = self.slice_bias, self.num_slice_buckets - 1

        def add_slice_bias(score, b, h, q_idx, kv_idx):
            zq, zk = token_slices[q_idx], token_slices[kv_idx]
            dist = torch.where((zq < 0) | (zk < 0), 0, (zq - zk).abs().clamp(max=last))
            return score + table[h, dist].to(score.dtype)

        return add_slice_bias
