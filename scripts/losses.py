"""Contrastive losses of the bundle and the helpers that decide which pairs are positives."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def text_key(text: str) -> int:
    """A stable 64-bit key of a text (whitespace-normalised), equal for identical reports on every rank."""
    digest = hashlib.blake2b(" ".join(text.split()).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def pair_keys(studies: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
    """``(B, 2)`` int64 keys ``(study, text)`` of a batch, the input of `positive_groups`."""
    return torch.tensor([[text_key(str(s)), text_key(t)] for s, t in zip(studies, texts)], dtype=torch.long)


def positive_groups(keys: torch.Tensor) -> torch.Tensor:
    """Group ids ``(B,)``: items sharing a study or an identical report fall in one group (transitively).

    Args:
        keys: ``(B, 2)`` int64 ``(study key, text key)`` from `pair_keys`, possibly gathered over ranks.

    Returns:
        ``(B,)`` int64, the smallest item index of each item's group.
    """
    keys = keys.cpu()
    same = (keys[:, None, :] == keys[None, :, :]).any(-1)  # (B, B): shares a study or a text
    group = torch.arange(keys.shape[0])
    while True:  # label propagation to the connected component's minimum index
        new = torch.where(same, group[None, :], keys.shape[0]).min(1).values
        if torch.equal(new, group):
            return group
        group = new


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x (B, ...)`` from all ranks along dim 0, keeping gradients to every rank's part.

    Identity without an initialised process group. With DDP, a loss computed on the gathered batch by
    every rank gives, after DDP's gradient averaging, the single-process gradient of the full batch
    (each rank's backward sums the ``world_size`` identical losses' gradients into its own part).
    Every rank must pass the same batch size.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """Concatenate integer keys ``(B, 2)`` from all ranks (no gradient); identity on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys)
    return torch.cat(parts, dim=0)


class ContrastiveInfoNCELoss(nn.Module):
    """Symmetric InfoNCE between image and text embeddings (CLIP, arXiv:2103.00020, sec. 2.3).

    ``logits = logit_scale * normalize(image) @ normalize(text).T``; the loss is the mean of the
    image->text and text->image cross-entropies. Without ``group_ids`` the targets are the diagonal.
    With ``group_ids``, items of one group (same study, identical report) are positives for each
    other: each row's target spreads uniformly over its group, so they are never pushed apart as
    false negatives.

    Shapes:
        ``forward(image_emb (B, E), text_emb (B, E), logit_scale () , group_ids (B,) | None) -> ()``.

    Raises:
        ValueError: batch sizes or widths of the two embeddings differ.
    """

    def forward(
        self,
        image_emb: torch.Tensor,
        text_emb: torch.Tensor,
        logit_scale: torch.Tensor,
        group_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image_emb.shape != text_emb.shape:
            raise ValueError(f"image embeddings {tuple(image_emb.shape)} != text embeddings {tuple(text_emb.shape)}")
        image_emb = F.normalize(image_emb.float(), dim=-1)
        text_emb = F.normalize(text_emb.float(), dim=-1)
        logits = logit_scale.float() * image_emb @ text_emb.T  # (B, B), rows: images, columns: texts
        if group_ids is None:
            targets = torch.eye(logits.shape[0], device=logits.device)
        else:
            group_ids = group_ids.to(logits.device)
            same = (group_ids[:, None] == group_ids[None, :]).float()  # (B, B), symmetric
            targets = same / same.sum(1, keepdim=True)
        image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
        text_to_image = -(targets * F.log_softmax(logits.T, dim=1)).sum(1).mean()
        return (image_to_text + text_to_image) / 2
