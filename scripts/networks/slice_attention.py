"""Slice-aware multi-head self-attention: a learnable bias per head and slice distance.

The logit between tokens ``i`` and ``j`` gets ``bias[h, min(|z_i - z_j|, S - 1)]``, where ``z`` is the
token's slice row on the patch grid and ``S = 32`` by default (a relative position bias along the slice
axis only, in the spirit of Shaw et al., arXiv:1803.02155, and Swin's bias table, arXiv:2103.14030).
The CLS token is exempt: its distance to every token is 0.

Three paths share one switch, ``attention_impl``:

- ``"fused"`` (default): the bias depends only on the two tokens' slice rows, so for ``Z`` rows it is
  a ``(nh, Z, Z)`` matrix and enters exactly as ``Z`` extra channels of queries and keys
  (`fold_bias_into_channels`): then `torch.nn.functional.scaled_dot_product_attention` runs without a
  mask, on its fused kernels (flash / memory-efficient on CUDA, the fused CPU kernel), in memory linear
  in the tokens. Scripts with `torch.jit.script`.
- ``"reference"``: SDPA with the full ``(nh, T, T)`` bias as a float mask. It materialises ``T x T``
  per head (12.9 GB per block at the seed's 16,385 tokens in float32): the numerical ground truth, for
  small inputs.
- ``"flex"``: `torch.nn.attention.flex_attention`, compiled, with the bias as a ``score_mod``; fused,
  but compiled per shape and not scriptable. Kept so that benchmarks can compare it on CUDA.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import flex_attention

ATTENTION_IMPLS = ("fused", "reference", "flex")

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


def padded_width(width: int, multiple: int = 8) -> int:
    """``width`` rounded up to a multiple of ``multiple`` (CUDA's fused SDPA kernels want head dims of 8k)."""
    return (width + multiple - 1) // multiple * multiple


def fold_bias_into_channels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_extra: torch.Tensor, k_extra: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append channels to queries and keys so that their dot product carries an additive logit bias.

    ``q' = [q, q_extra]``, ``k' = [k, k_extra]``, so ``scale * q'_i . k'_j = scale * q_i . k_j +
    scale * q_extra_i . k_extra_j``: when ``k_extra`` is a one-hot of the key's group (its slice row)
    and ``q_extra`` the query's bias row over the groups divided by ``scale``, this is exactly the biased
    logit, and SDPA (given ``scale`` explicitly, as the head dim changes) runs without a mask. ``v`` gets
    zero channels (fused kernels want one head dim for q, k and v); the width is padded to a multiple of
    8. Slice the attention output back to ``hd`` channels.

    Args:
        q, k, v: ``(B, nh, Tq, hd)``, ``(B, nh, Tk, hd)``, ``(B, nh, Tk, hd)``.
        q_extra: ``(B | 1, nh | 1, Tq, G)`` bias of each query over the ``G`` key groups, over ``scale``.
        k_extra: ``(B | 1, nh | 1, Tk, G)`` group membership of each key (one-hot, or zeros for none).

    Returns:
        ``q', k', v'`` of width ``padded_width(hd + G)``.
    """
    b, nh, tq, hd = q.shape
    tk = k.shape[2]
    groups = q_extra.shape[-1]
    pad = padded_width(hd + groups) - hd - groups
    # one allocation each: (B, nh, T, hd + G + pad)
    q_out = torch.cat([q, q_extra.expand(b, nh, tq, groups), q.new_zeros(1, 1, 1, pad).expand(b, nh, tq, pad)], -1)
    k_out = torch.cat([k, k_extra.expand(b, nh, tk, groups), k.new_zeros(1, 1, 1, pad).expand(b, nh, tk, pad)], -1)
    v_out = torch.cat([v, v.new_zeros(1, 1, 1, groups + pad).expand(b, nh, tk, groups + pad)], -1)
    return q_out, k_out, v_out


class SliceAwareSelfAttention(nn.Module):
    """Multi-head self-attention with a learnable slice-distance bias.

    Args:
        embed_dim: token width ``C``.
        num_heads: heads ``nh``; ``C`` must be divisible by ``nh``.
        num_slice_buckets: length ``S`` of the per-head bias table ``(nh, S)``; distances of ``S - 1``
            patch rows or more share the last entry.
        attention_impl: ``"fused"``, ``"reference"`` or ``"flex"``; see the module docstring.
        use_slice_bias: ``False`` builds a plain ViT self-attention (no bias table), the ablation baseline.

    Shapes:
        ``forward(x (B, T, C), token_slices (T,), num_slice_rows) -> (B, T, C)``; ``token_slices`` holds
        each token's slice row in ``[0, num_slice_rows)`` (``Z``, the patch grid's slice rows), ``-1`` for
        the CLS token.

    Raises:
        ValueError: ``C`` not divisible by ``nh``, or an unknown ``attention_impl``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_slice_buckets: int = 32,
        attention_impl: str = "fused",
        use_slice_bias: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.scale = self.head_dim**-0.5
        self.num_slice_buckets = num_slice_buckets
        self.attention_impl = attention_impl
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.slice_bias = nn.Parameter(torch.zeros(num_heads, num_slice_buckets)) if use_slice_bias else None

    def forward(self, x: torch.Tensor, token_slices: torch.Tensor, num_slice_rows: int) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim)  # (B, T, 3C) -> (B, T, 3, nh, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> 3 x (B, nh, T, hd)
        slice_bias = self.slice_bias
        if slice_bias is None:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        elif self.attention_impl == "fused":
            q_extra, k_extra = self._bias_channels(slice_bias, token_slices, num_slice_rows, q.dtype)
            q, k, v = fold_bias_into_channels(q, k, v, q_extra[None], k_extra[None, None])
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, nh, T, hd + Z + pad)
            out = out[..., : self.head_dim]  # -> (B, nh, T, hd)
        elif self.attention_impl == "flex":
            out = self._flex_attention(q, k, v, slice_bias, token_slices)
        else:
            index = slice_distance_index(token_slices, self.num_slice_buckets)  # (T, T)
            bias = slice_bias[:, index].to(q.dtype)[None]  # (1, nh, T, T)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, t, c)  # (B, nh, T, hd) -> (B, T, C)
        return self.proj(out)

    def _bias_channels(
        self, slice_bias: torch.Tensor, token_slices: torch.Tensor, num_slice_rows: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The slice bias as extra query channels ``(nh, T, Z)`` (over ``scale``) and one-hot key channels ``(T, Z)``.

        Query ``i`` gets ``(bias[h, d(z_i, z)] - bias[h, 0]) / scale`` for every slice row ``z``, key ``j``
        the one-hot of ``z_j``. Subtracting ``bias[h, 0]`` from a query's whole row leaves its softmax
        unchanged and lets the CLS token, at distance 0 from everything, take zeros on both sides: no
        extra channel for it.
        """
        rows = torch.arange(num_slice_rows, device=token_slices.device)
        table = slice_bias[:, slice_distance_index(rows, self.num_slice_buckets)]  # (nh, Z, Z)
        table = (table - slice_bias[:, :1, None]) / self.scale  # relative to distance 0
        table = F.pad(table, [0, 0, 0, 1]).to(dtype)  # (nh, Z + 1, Z): row Z (the CLS token's) all zero
        row = torch.where(token_slices < 0, num_slice_rows, token_slices)  # (T,): CLS -> Z
        q_extra = table[:, row]  # (nh, T, Z)
        k_extra = (row[:, None] == rows[None, :]).to(dtype)  # (T, Z): one-hot, all zero for CLS
        return q_extra, k_extra

    @torch.jit.unused
    def _flex_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_bias: torch.Tensor, token_slices: torch.Tensor
    ) -> torch.Tensor:
        """Compiled FlexAttention with the slice bias as ``score_mod`` (not scriptable: excluded from TorchScript)."""
        last = self.num_slice_buckets - 1

        def add_slice_bias(score, b, h, q_idx, kv_idx):
            zq, zk = token_slices[q_idx], token_slices[kv_idx]
            dist = torch.where((zq < 0) | (zk < 0), 0, (zq - zk).abs().clamp(max=last))
            return score + slice_bias[h, dist].to(score.dtype)

        return compiled_flex_attention()(q, k, v, score_mod=add_slice_bias, scale=self.scale)
