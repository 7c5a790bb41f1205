"""Small heads on the encoder's features: auxiliary per-patch region prediction and the finding classifier."""

import torch
from torch import nn


class SegmentationAuxHead(nn.Module):
    """Per-patch anatomy prediction from the local features, an auxiliary task that keeps anatomy local.

    One linear layer ``C -> R + 1`` on each patch token; class 0 is background and ``1..R`` the regions,
    the order of the anatomy encoder and of `scripts.losses.segmentation_targets`. Train it with
    `scripts.losses.SegmentationLoss` against ``[background_fraction, patch_to_region]``.

    Args:
        embed_dim: token width ``C``.
        num_regions: ``R``.

    Shapes:
        ``forward(local_features (B, N, C)) -> logits (B, N, R + 1)``.

    Raises:
        ValueError: the features are not ``(B, N, C)``.
    """

    def __init__(self, embed_dim: int, num_regions: int) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, num_regions + 1)

    def forward(self, local_features: torch.Tensor) -> torch.Tensor:
        if local_features.ndim != 3 or local_features.shape[-1] != self.linear.in_features:
            raise ValueError(
                f"expected local_features (B, N, {self.linear.in_features}), got {list(local_features.shape)}"
            )
        return self.linear(local_features)


class FindingHead(nn.Module):
    """Multi-label classifier of the 18 CT-RATE findings on the pooled image features.

    One linear layer ``C -> F`` on ``global_features``; its sigmoid scores feed the AUROC evaluation.
    Train it with `scripts.losses.FindingLoss` (BCE, unknown labels masked). With
    ``detach_features=True`` the features are detached, so the head is a linear probe of a frozen
    (or jointly trained but unaffected) encoder; with ``False`` its gradient trains the encoder too.

    Args:
        embed_dim: feature width ``C``.
        num_findings: ``F``, 18 for CT-RATE.
        detach_features: stop the gradient into the encoder.

    Shapes:
        ``forward(global_features (B, C)) -> logits (B, F)``.

    Raises:
        ValueError: the features are not ``(B, C)``.
    """

    def __init__(self, embed_dim: int, num_findings: int = 18, detach_features: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(embed_dim, num_findings)
        self.detach_features = detach_features

    def forward(self, global_features: torch.Tensor) -> torch.Tensor:
        if global_features.ndim != 2 or global_features.shape[-1] != self.linear.in_features:
            raise ValueError(
                f"expected global_features (B, {self.linear.in_features}), got {list(global_features.shape)}"
            )
        if self.detach_features:
            global_features = global_features.detach()
        return self.linear(global_features)
