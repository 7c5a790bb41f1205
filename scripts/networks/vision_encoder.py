"""The anatomy-aware 3D CT vision encoder (the bundle's ``network_def``)."""

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .anatomy_encoder import AnatomyEncoder
from .block import TransformerBlock
from .heads import FindingHead, SegmentationAuxHead
from .patch_embedding import PatchEmbedding3D, patch_grid_positions

PROJECTION_HEADS = ("global", "local", "region")


def rename_legacy_head_keys(state_dict: dict, prefix: str, *args) -> None:
    """Load-time hook: checkpoints written before the heads became attributes name them ``heads.<name>.*``.

    Renames ``{prefix}heads.{global,local,region}.weight`` to ``{prefix}{name}_head.weight`` in place.
    """
    for name in PROJECTION_HEADS:
        old = f"{prefix}heads.{name}.weight"
        if old in state_dict:
            state_dict[f"{prefix}{name}_head.weight"] = state_dict.pop(old)


class AnatomyAwareCTEncoder(nn.Module):
    """3D CT encoder that reads the CT together with its TotalSegmentator label map.

    Pipeline: 3D patch embedding (+ factorised 3D positional embedding, CLS token) -> ``depth`` pre-norm
    blocks (slice-aware self-attention, region-aware cross-attention, MLP) -> final LayerNorm -> pooled
    features and projection heads. The anatomy encoder turns the label map into patch-to-region
    fractions once; each anatomy block recomputes the region tokens from its own input.

    Input (Model Zoo packing): ``image (B, 2, D, H, W)``, channel 0 the CT in HU windowed to [-1, 1],
    channel 1 the TotalSegmentator v2 label ids; ``D`` is the slice (z) axis and each side must be a
    multiple of ``patch_size``. ``forward(image)`` returns the L2-normalised global embedding ``(B, E)``;
    `forward_features` returns everything:

    - ``global_features (B, C)``: mean of the patch tokens after the final norm (not the CLS token);
    - ``local_features (B, N, C)``: patch tokens after the final norm, ``N = Z * Y * X`` (CLS excluded);
    - ``region_features (B, R, C)``: region tokens of the final patch tokens (an absent region gives
      its region embedding alone; see ``region_present``);
    - ``cls_token (B, C)``;
    - ``patch_positions (B, N, 3)``: integer patch-grid indices ``(z, y, x)``;
    - ``patch_to_region (B, N, R)``, ``background_fraction (B, N)``, ``region_present (B, R)``;
    - ``global_embedding (B, E)``, and ``local_embedding (B, N, E)`` / ``region_embedding (B, R, E)``
      when those heads are built: L2-normalised projections of the matching features;
    - ``segmentation_logits (B, N, R + 1)`` (auxiliary per-patch anatomy, class 0 background) and
      ``finding_logits (B, F)`` (the CT-RATE findings) when those heads are built.

    Args:
        region_class_ids: TotalSegmentator v2 label ids of each of the ``R`` regions.
        embed_dim: token width ``C`` (seed 768).
        depth: number of blocks (seed 12).
        num_heads: attention heads (seed 12).
        patch_size: ``(pz, py, px)`` voxels per patch (seed (4, 16, 16)).
        input_size: nominal ``(D, H, W)`` input (seed (64, 512, 512)); sizes the learned positional
            tables, which interpolate to other inputs.
        projection_dim: embedding width ``E`` (512).
        projection_heads: which projection heads to build, from ``("global", "local", "region")``;
            ``"global"`` is required. Build only the heads a loss uses (DDP needs every parameter used).
        block_type: ``"anatomy"`` (full block) or ``"plain"`` (ViT block baseline).
        attention_impl: ``"fused"`` (SDPA with the bias folded into extra channels; the default, and what
            TorchScript export needs), ``"reference"`` (SDPA with the explicit ``T x T`` bias; small inputs
            only) or ``"flex"`` (compiled FlexAttention); see `slice_attention`.
        pos_embed_type: ``"learned"`` or ``"sinusoidal"``.
        mlp_ratio: MLP hidden width / ``C``.
        gradient_checkpointing: recompute each block in backward (training only) to save memory; not
            part of a TorchScript export.
        segmentation_head: build the auxiliary per-patch anatomy head (`SegmentationAuxHead`).
        finding_head: build the finding classifier (`FindingHead`) on ``global_features``.
        num_findings: classes of the finding head (18 CT-RATE findings).
        finding_probe: detach the finding head's input, so it is a linear probe of the encoder.

    Raises:
        ValueError: bad ``projection_heads``, a flag that is not a bool, an ``input_size`` that is not a
            multiple of ``patch_size``, or an input that is not ``(B, 2, D, H, W)``; see also the parts'
            own errors (sizes not multiples of the patch, unknown options).
    """

    def __init__(
        self,
        region_class_ids: Sequence[Sequence[int]],
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        patch_size: Sequence[int] = (4, 16, 16),
        input_size: Sequence[int] = (64, 512, 512),
        projection_dim: int = 512,
        projection_heads: Sequence[str] = PROJECTION_HEADS,
        block_type: str = "anatomy",
        attention_impl: str = "fused",
        pos_embed_type: str = "learned",
        mlp_ratio: float = 4.0,
        gradient_checkpointing: bool = False,
        segmentation_head: bool = False,
        finding_head: bool = False,
        num_findings: int = 18,
        finding_probe: bool = False,
    ) -> None:
        super().__init__()
        unknown = set(projection_heads) - set(PROJECTION_HEADS)
        if unknown or "global" not in projection_heads:
            raise ValueError(
                f"projection_heads must include 'global' and come from {PROJECTION_HEADS}, got {projection_heads}"
            )
        flags = {"gradient_checkpointing": gradient_checkpointing, "segmentation_head": segmentation_head,
                 "finding_head": finding_head, "finding_probe": finding_probe}  # fmt: skip
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be True or False, got {value!r}")
        if any(int(s) % int(p) for s, p in zip(input_size, patch_size)):
            raise ValueError(
                f"input_size {tuple(input_size)} (D, H, W) is not a multiple of patch_size {tuple(patch_size)}"
            )
        grid_size = [int(s) // int(p) for s, p in zip(input_size, patch_size)]
        self.patch_embed = PatchEmbedding3D(1, embed_dim, patch_size, grid_size, pos_embed_type)
        self.anatomy = AnatomyEncoder(region_class_ids, embed_dim, patch_size)
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, mlp_ratio, block_type, attention_impl) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        # one attribute per projection head (not a dict keyed "global", a Python keyword that a saved
        # TorchScript model cannot load back)
        self.global_head = nn.Linear(embed_dim, projection_dim, bias=False)
        self.local_head = nn.Linear(embed_dim, projection_dim, bias=False) if "local" in projection_heads else None
        self.region_head = nn.Linear(embed_dim, projection_dim, bias=False) if "region" in projection_heads else None
        self.segmentation_head = SegmentationAuxHead(embed_dim, self.anatomy.num_regions) if segmentation_head else None
        self.finding_head = FindingHead(embed_dim, num_findings, finding_probe) if finding_head else None
        self.gradient_checkpointing = gradient_checkpointing
        self._register_load_state_dict_pre_hook(rename_legacy_head_keys)

    @property
    def num_regions(self) -> int:
        return self.anatomy.num_regions

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.forward_features(image)["global_embedding"]

    def forward_features(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        if image.dim() != 5 or image.shape[1] != 2:
            raise ValueError(f"expected image (B, 2, D, H, W) = CT and label map, got {list(image.shape)}")
        ct, label_map = image[:, :1], image[:, 1:]
        x, grid = self.patch_embed(ct)  # (B, 1 + N, C)
        out = self.anatomy.assign(label_map)  # patch_to_region (B, N, R), background_fraction, region_present
        patch_to_region = out["patch_to_region"]
        positions = patch_grid_positions(grid, device=x.device)  # (N, 3)
        cls_slice = torch.full([1], -1, dtype=positions.dtype, device=positions.device)
        token_slices = torch.cat([cls_slice, positions[:, 0]])  # (1 + N,): CLS marked -1
        num_slice_rows = grid[0]
        for index, block in enumerate(self.blocks):
            regions: Optional[torch.Tensor] = None
            if block.uses_regions:
                regions = self.anatomy.region_tokens(x[:, 1:], patch_to_region)  # (B, R, C) from this block's input
            if self.gradient_checkpointing and self.training and not torch.jit.is_scripting():
                x = self._checkpointed_block(index, x, token_slices, num_slice_rows, regions, patch_to_region)
            else:
                x = block(x, token_slices, num_slice_rows, regions, patch_to_region)
        x = self.norm(x)
        cls, local = x[:, 0], x[:, 1:]  # (B, C), (B, N, C)
        out["global_features"] = local.mean(1)
        out["local_features"] = local
        out["region_features"] = self.anatomy.region_tokens(local, patch_to_region)
        out["cls_token"] = cls
        out["patch_positions"] = positions[None].expand(x.shape[0], -1, -1)
        out["global_embedding"] = F.normalize(self.global_head(out["global_features"]), dim=-1)
        if self.local_head is not None:
            out["local_embedding"] = F.normalize(self.local_head(local), dim=-1)
        if self.region_head is not None:
            out["region_embedding"] = F.normalize(self.region_head(out["region_features"]), dim=-1)
        if self.segmentation_head is not None:
            out["segmentation_logits"] = self.segmentation_head(local)
        if self.finding_head is not None:
            out["finding_logits"] = self.finding_head(out["global_features"])
        return out

    @torch.jit.unused
    def _checkpointed_block(
        self,
        index: int,
        x: torch.Tensor,
        token_slices: torch.Tensor,
        num_slice_rows: int,
        regions: Optional[torch.Tensor],
        patch_to_region: torch.Tensor,
    ) -> torch.Tensor:
        """Block ``index`` under activation checkpointing (training only; excluded from TorchScript)."""
        block = self.blocks[index]
        return checkpoint(block, x, token_slices, num_slice_rows, regions, patch_to_region, use_reentrant=False)
