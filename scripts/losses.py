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


def region_text_inputs(region_text: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Flatten a batch's per-region sentences for the text encoder, with their keys.

    Args:
        region_text: ``B`` lists of ``R`` strings, the sentences assigned to each region joined, ``""``
            for a region without a sentence (the collated ``region_text`` field).

    Returns:
        ``texts``: the non-blank strings in row-major ``(b, r)`` order; ``has_text (B, R)`` bool; and
        ``text_keys (B, R)`` int64 (`text_key` of each string, 0 where blank). The encoder's output
        ``(M, E)`` scatters back with ``region_text_emb = emb.new_zeros(B, R, E);
        region_text_emb[has_text] = emb`` (boolean indexing walks the same row-major order).

    Raises:
        ValueError: the items do not all list the same number of regions.
    """
    num_regions = len(region_text[0]) if len(region_text) else 0
    for b, row in enumerate(region_text):
        if len(row) != num_regions:
            raise ValueError(f"region_text item {b} has {len(row)} regions, item 0 has {num_regions}")
    has_text = torch.tensor([[bool(t.strip()) for t in row] for row in region_text], dtype=torch.bool)
    keys = torch.tensor([[text_key(t) if t.strip() else 0 for t in row] for row in region_text], dtype=torch.long)
    texts = [t for row in region_text for t in row if t.strip()]
    return texts, has_text.view(len(region_text), num_regions), keys.view(len(region_text), num_regions)


def step_inputs(cot_steps: Sequence[Sequence[dict]], num_regions: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Flatten a batch's chain-of-thought steps for the text encoder and `StepRegionLoss`.

    Steps with a blank text or no named region are dropped (they could not contribute to the loss).

    Args:
        cot_steps: ``B`` lists of steps ``{"text": str, "regions": list[int]}`` (0-based region indices).
        num_regions: ``R``.

    Returns:
        ``texts`` (``S`` strings), ``step_item (S,)`` int64 (the batch item of each step) and
        ``step_regions (S, R)`` bool (the regions each step names).

    Raises:
        ValueError: a region index outside ``[0, R)``, naming the item and the step.
    """
    texts, items, named = [], [], []
    for b, steps in enumerate(cot_steps):
        for s, step in enumerate(steps):
            regions = [int(r) for r in step["regions"]]
            bad = [r for r in regions if not 0 <= r < num_regions]
            if bad:
                raise ValueError(f"cot_steps item {b} step {s}: region indices {bad} outside [0, {num_regions})")
            if not step["text"].strip() or not regions:
                continue
            row = torch.zeros(num_regions, dtype=torch.bool)
            row[regions] = True
            texts.append(step["text"])
            items.append(b)
            named.append(row)
    step_regions = torch.stack(named) if named else torch.zeros(0, num_regions, dtype=torch.bool)
    return texts, torch.tensor(items, dtype=torch.long), step_regions


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
    """Concatenate integer keys ``(B, ...)`` from all ranks (no gradient); identity on one process.

    Used for the ``(B, 2)`` pair keys and, cast to int64, for the region term's ``(B, R)`` keys and flags.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    parts = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, keys)
    return torch.cat(parts, dim=0)


def group_targets(group_ids: torch.Tensor | None, batch_size: int, device: torch.device) -> torch.Tensor:
    """Soft InfoNCE targets ``(B, B)``: each row spread uniformly over the items of its group.

    Without ``group_ids`` the targets are the identity (CLIP's diagonal). The matrix is symmetric in
    its support and each row sums to 1, so it serves both directions.

    Raises:
        ValueError: ``group_ids`` is not ``(B,)``.
    """
    if group_ids is None:
        return torch.eye(batch_size, device=device)
    if group_ids.shape != (batch_size,):
        raise ValueError(f"group_ids {tuple(group_ids.shape)} != batch ({batch_size},)")
    group_ids = group_ids.to(device)
    same = (group_ids[:, None] == group_ids[None, :]).float()  # (B, B), symmetric
    return same / same.sum(1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets along the last axis: ``(..., K), (..., K) -> (...)``.

    A row whose targets are all zero gives exactly 0 (and no gradient), provided its logits are finite.
    """
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)


def soft_infonce(image_to_text: torch.Tensor, text_to_image: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on precomputed logits: mean of the two directions' mean row cross-entropies.

    Args:
        image_to_text: ``(B, B)`` logits, rows images, columns texts.
        text_to_image: ``(B, B)`` logits, rows texts, columns images (CLIP passes ``image_to_text.T``;
            FILIP passes its own text-side similarity).
        targets: ``(B, B)`` soft targets of the image rows (rows sum to 1); the text rows use ``targets.T``.
    """
    return (soft_cross_entropy(image_to_text, targets).mean() + soft_cross_entropy(text_to_image, targets.T).mean()) / 2


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
        ValueError: batch sizes or widths of the two embeddings differ; ``group_ids`` is not ``(B,)``.
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
        return soft_infonce(logits, logits.T, group_targets(group_ids, logits.shape[0], logits.device))


def _masked_fill_value(logits: torch.Tensor) -> float:
    """A finite stand-in for ``-inf``: masked logits get probability 0 but a fully masked row stays finite."""
    return torch.finfo(logits.dtype).min


def region_soft_targets(valid: torch.Tensor, text_keys: torch.Tensor, is_normal: torch.Tensor) -> torch.Tensor:
    """Per-region soft targets ``(R, B, B)`` of `RegionSentenceLoss`, the fVLM false-negative handling.

    For region ``r``, items ``i`` and ``j`` (both valid for ``r``) are positives when their texts are
    identical (equal ``text_keys``) or both are the region's normal template (``is_normal``); each row
    spreads uniformly over its positives. Rows and columns of invalid items are zero. Example: two items
    with identical text and a third with another text give
    ``[[1/2, 1/2, 0], [1/2, 1/2, 0], [0, 0, 1]]``.

    Args:
        valid: ``(B, R)`` bool, region present in the image and given a sentence.
        text_keys: ``(B, R)`` int64 `text_key` of each region's text.
        is_normal: ``(B, R)`` bool, the text is a normal template of that region.
    """
    valid, keys, normal = valid.T.bool(), text_keys.T, is_normal.T.bool()  # (B, R) -> (R, B)
    positive = (keys[:, :, None] == keys[:, None, :]) | (normal[:, :, None] & normal[:, None, :])  # (R, B, B)
    positive = (positive & valid[:, :, None] & valid[:, None, :]).float()
    return positive / positive.sum(-1, keepdim=True).clamp_min(1.0)


class RegionSentenceLoss(nn.Module):
    """Region-sentence InfoNCE, one contrast per anatomical region (fVLM, arXiv:2501.14548, ICLR 2025).

    For each region ``r``, the items valid for ``r`` (region present in the CT and at least one report
    sentence assigned to it) form an ``n_r x n_r`` symmetric InfoNCE between the projected region
    features and the embeddings of the region's sentences, ``logits = logit_scale * region @ text.T``.
    Following fVLM's false-negative handling, identical texts and pairs of normal-template texts are
    soft positives of each other (`region_soft_targets`), so healthy lungs of two patients are not
    pushed apart. (fVLM also calibrates similar abnormal descriptions; here only identical texts count.)

    The loss is the mean over regions with at least two valid items. A region with a single valid item
    would give a 1 x 1 InfoNCE, identically 0 with no gradient; it is left out of the mean so that the
    loss scale does not depend on how many regions happen to appear once. With no such region the loss
    is an exact 0 connected to the graph (backward gives zero gradients). Invalid entries are masked,
    so an absent region's embedding gets exactly zero gradient.

    Shapes:
        ``forward(region_emb (B, R, E), region_text_emb (B, R, E), valid (B, R), text_keys (B, R),
        is_normal (B, R), logit_scale ()) -> ()``. Embeddings are re-normalised; text rows of invalid
        entries may be zeros. With DDP, gather all six batch inputs across ranks for global negatives.

    Raises:
        ValueError: the two embeddings differ in shape, or a flag/key tensor is not ``(B, R)``.
    """

    def forward(
        self,
        region_emb: torch.Tensor,
        region_text_emb: torch.Tensor,
        valid: torch.Tensor,
        text_keys: torch.Tensor,
        is_normal: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        if region_emb.ndim != 3 or region_emb.shape != region_text_emb.shape:
            raise ValueError(
                f"region embeddings {tuple(region_emb.shape)} != region text embeddings {tuple(region_text_emb.shape)}"
            )
        for name, flags in (("valid", valid), ("text_keys", text_keys), ("is_normal", is_normal)):
            if flags.shape != region_emb.shape[:2]:
                raise ValueError(f"{name} {tuple(flags.shape)} != (B, R) {tuple(region_emb.shape[:2])}")
        region_emb = F.normalize(region_emb.float(), dim=-1)
        region_text_emb = F.normalize(region_text_emb.float(), dim=-1)
        valid = valid.to(region_emb.device).bool()
        # (B, R, E) x (B, R, E) -> (R, B, B): per region, rows region crops, columns region texts
        logits = logit_scale.float() * torch.einsum("bre,cre->rbc", region_emb, region_text_emb)
        pair = valid.T[:, :, None] & valid.T[:, None, :]  # (R, B, B)
        logits = logits.masked_fill(~pair, _masked_fill_value(logits))
        targets = region_soft_targets(valid, text_keys.to(valid.device), is_normal.to(valid.device))  # (R, B, B)
        rows = soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.mT, targets.mT)  # (R, B), 0 if invalid
        count = valid.sum(0)  # (R,)
        per_region = rows.sum(1) / (2 * count.clamp_min(1))  # (R,)
        counted = count >= 2
        return (per_region * counted).sum() / counted.sum().clamp_min(1)


class StepRegionLoss(nn.Module):
    """Chain-of-thought step to region alignment: each step against the regions of its own volume.

    Step ``s`` of batch item ``b`` scores every region present in ``b``:
    ``logits[s, r] = logit_scale * step_emb[s] . region_emb[b, r]``; the target spreads uniformly over the
    regions the step names that are present, and the loss is the soft cross-entropy (an InfoNCE whose
    negatives are the other present regions of the same CT, in the spirit of CLIP, arXiv:2103.00020,
    applied within one volume as in fVLM's anatomy-level alignment, arXiv:2501.14548). Absent regions are
    masked out (exactly zero gradient into their embeddings). Steps naming no present region are
    skipped; the loss is the mean over the remaining steps, an exact 0 connected to the graph when none
    remain. Steps are per-volume, so no DDP gather is needed: pass each rank's own ``region_emb``.

    Shapes:
        ``forward(step_emb (S, E), step_item (S,) int64, step_regions (S, R) bool, region_emb (B, R, E),
        region_present (B, R) bool, logit_scale ()) -> ()``; ``S`` may be 0.

    Raises:
        ValueError: inconsistent shapes, or a ``step_item`` outside ``[0, B)``.
    """

    def forward(
        self,
        step_emb: torch.Tensor,
        step_item: torch.Tensor,
        step_regions: torch.Tensor,
        region_emb: torch.Tensor,
        region_present: torch.Tensor,
        logit_scale: torch.Tensor,
    ) -> torch.Tensor:
        b, r, e = region_emb.shape
        s = step_emb.shape[0]
        if step_emb.shape != (s, e) or step_item.shape != (s,) or step_regions.shape != (s, r):
            raise ValueError(
                f"step_emb {tuple(step_emb.shape)}, step_item {tuple(step_item.shape)}, step_regions "
                f"{tuple(step_regions.shape)} do not fit S={s} steps, R={r} regions, E={e}"
            )
        if region_present.shape != (b, r):
            raise ValueError(f"region_present {tuple(region_present.shape)} != (B, R) {(b, r)}")
        step_item = step_item.to(region_emb.device)
        if s and (int(step_item.min()) < 0 or int(step_item.max()) >= b):
            raise ValueError(f"step_item holds items outside [0, {b}): {step_item.tolist()}")
        region_emb = F.normalize(region_emb.float(), dim=-1)[step_item]  # (B, R, E) -> (S, R, E)
        step_emb = F.normalize(step_emb.float(), dim=-1)
        logits = logit_scale.float() * torch.einsum("se,sre->sr", step_emb, region_emb)  # (S, R)
        present = region_present.to(region_emb.device).bool()[step_item]  # (S, R)
        positive = (step_regions.to(present.device).bool() & present).float()  # (S, R)
        targets = positive / positive.sum(-1, keepdim=True).clamp_min(1.0)
        rows = soft_cross_entropy(logits.masked_fill(~present, _masked_fill_value(logits)), targets)  # (S,)
        kept = positive.sum(-1) > 0  # (S,)
        return (rows * kept).sum() / kept.sum().clamp_min(1)


def token_patch_similarity(
    local_emb: torch.Tensor, token_emb: torch.Tensor, token_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FILIP cross-modal late-interaction similarities between every CT and every text (arXiv:2111.07783).

    ``image_to_text[i, j]``: for each patch of CT ``i`` the best-matching token of text ``j``, averaged over
    the ``N`` patches. ``text_to_image[i, j]``: for each (unpadded) token of text ``j`` the best-matching
    patch of CT ``i``, averaged over the text's tokens. Padding tokens never win a maximum nor count.

    Memory: the loop runs over text items, so only one ``(B_img, N, L)`` similarity block exists at a
    time (at ``B_img = 16``, ``N = 16384``, ``L = 512`` in bfloat16: 256 MiB; float32: 512 MiB) instead
    of ``(B_img, B_txt, N, L)`` (16x that at ``B_txt = 16``); backward builds one block's gradient per text
    likewise. The graph keeps only the arg-max indices, ``B_txt * B_img * (N + L)`` int64 (33 MiB at that
    size), plus the inputs. Autocast is off inside and the inputs are cast once to their common dtype,
    so no per-text copy of ``local_emb`` is saved. Compute is ``2 * B_img * B_txt * N * L * E`` FLOPs.

    Args:
        local_emb: ``(B_img, N, E)`` L2-normalised patch embeddings (not re-normalised here).
        token_emb: ``(B_txt, L, E)`` L2-normalised token embeddings (`HFTextEncoder.forward_with_tokens`).
        token_mask: ``(B_txt, L)`` bool (or 0/1) attention mask, True for real tokens.

    Returns:
        ``(image_to_text, text_to_image)``, both ``(B_img, B_txt)`` float32, rows CTs, columns texts.

    Raises:
        ValueError: widths differ, the mask is not ``(B_txt, L)``, or a text has no token.
    """
    if local_emb.ndim != 3 or token_emb.ndim != 3 or local_emb.shape[-1] != token_emb.shape[-1]:
        raise ValueError(
            f"local embeddings {tuple(local_emb.shape)} and token embeddings {tuple(token_emb.shape)} do not match"
        )
    if token_mask.shape != token_emb.shape[:2]:
        raise ValueError(f"token_mask {tuple(token_mask.shape)} != (B_txt, L) {tuple(token_emb.shape[:2])}")
    mask = token_mask.to(token_emb.device).bool()
    lengths = mask.sum(1)  # (B_txt,)
    if bool((lengths == 0).any()):
        raise ValueError(f"texts {torch.nonzero(lengths == 0).flatten().tolist()} have no token")
    dtype = torch.promote_types(local_emb.dtype, token_emb.dtype)
    image_to_text, text_to_image = [], []
    with torch.autocast(local_emb.device.type, enabled=False):
        local, tokens = local_emb.to(dtype), token_emb.to(dtype)
        for j in range(tokens.shape[0]):
            sim = torch.einsum("bne,le->bnl", local, tokens[j])  # (B_img, N, L)
            best_patch = sim.max(1).values  # (B_img, L); max saves only its indices, so sim may change below
            best_token = sim.masked_fill_(~mask[j], float("-inf")).max(2).values  # (B_img, N), in place
            image_to_text.append(best_token.float().mean(1))  # (B_img,)
            text_to_image.append((best_patch.float() * mask[j]).sum(1) / lengths[j])  # (B_img,)
    return torch.stack(image_to_text, 1), torch.stack(text_to_image, 1)  # (B_img, B_txt) each


class LocalAlignmentLoss(nn.Module):
    """Token-to-patch fine-grained contrastive loss, FILIP style (arXiv:2111.07783).

    The CT-report similarities come from `token_patch_similarity` (max over patches per token, max over
    tokens per patch); the image->text cross-entropy uses the patch-side similarity and the
    text->image cross-entropy the token-side one, as in FILIP. Targets are those of
    `ContrastiveInfoNCELoss`: the diagonal, or spread over ``group_ids`` (same study, identical report).
    See `token_patch_similarity` for the memory of the chunked computation.

    Shapes:
        ``forward(local_emb (B, N, E), token_emb (B, L, E), token_mask (B, L), logit_scale (),
        group_ids (B,) | None) -> ()``.

    Raises:
        ValueError: the CT and text batch sizes differ, plus `token_patch_similarity`'s errors.
    """

    def forward(
        self,
        local_emb: torch.Tensor,
        token_emb: torch.Tensor,
        token_mask: torch.Tensor,
        logit_scale: torch.Tensor,
        group_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if local_emb.shape[0] != token_emb.shape[0]:
            raise ValueError(f"{local_emb.shape[0]} CTs but {token_emb.shape[0]} texts")
        image_to_text, text_to_image = token_patch_similarity(local_emb, token_emb, token_mask)  # (B, B) each
        scale = logit_scale.float()
        targets = group_targets(group_ids, local_emb.shape[0], image_to_text.device)
        return soft_infonce(scale * image_to_text, scale * text_to_image.T, targets)


def segmentation_targets(patch_to_region: torch.Tensor, background_fraction: torch.Tensor) -> torch.Tensor:
    """Soft per-patch targets ``(B, N, R + 1)``: ``[background_fraction, patch_to_region]``, class 0 background.

    Raises:
        ValueError: ``background_fraction`` is not ``(B, N)`` of ``patch_to_region (B, N, R)``.
    """
    if background_fraction.shape != patch_to_region.shape[:2]:
        raise ValueError(
            f"background_fraction {tuple(background_fraction.shape)} != (B, N) {tuple(patch_to_region.shape[:2])}"
        )
    return torch.cat([background_fraction[..., None], patch_to_region], dim=-1).float()  # (B, N, 1 + R)


class SegmentationLoss(nn.Module):
    """Auxiliary segmentation loss: soft cross-entropy of `SegmentationAuxHead` logits per patch.

    The target of each patch is its voxel fractions ``[background_fraction, patch_to_region]`` (rows
    sum to 1), so the local features must keep which anatomy they cover. The mean runs over all
    ``B * N`` patches, pure background included. Soft cross-entropy equals ``KL(target || softmax) +
    H(target)``: the same gradient as KL, and its minimum is the target entropy, not 0.

    Shapes:
        ``forward(logits (B, N, R + 1), patch_to_region (B, N, R), background_fraction (B, N)) -> ()``.

    Raises:
        ValueError: the logits are not ``(B, N, R + 1)``, plus `segmentation_targets`'s errors.
    """

    def forward(
        self, logits: torch.Tensor, patch_to_region: torch.Tensor, background_fraction: torch.Tensor
    ) -> torch.Tensor:
        targets = segmentation_targets(patch_to_region, background_fraction)  # (B, N, R + 1)
        if logits.shape != targets.shape:
            raise ValueError(
                f"segmentation logits {tuple(logits.shape)} != targets (B, N, R + 1) {tuple(targets.shape)}"
            )
        return soft_cross_entropy(logits.float(), targets.to(logits.device)).mean()


class FindingLoss(nn.Module):
    """Multi-label binary cross-entropy of `FindingHead` logits over the 18 CT-RATE findings, NaN labels masked.

    Labels are 0/1 with NaN for unknown (a whole item or a single finding); unknown entries contribute
    nothing and get zero gradient. The loss is the mean over known entries, an exact 0 connected to the
    graph when none is known.

    Shapes:
        ``forward(logits (B, F), labels (B, F) float) -> ()``.

    Raises:
        ValueError: the logits and labels differ in shape.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape != labels.shape:
            raise ValueError(f"finding logits {tuple(logits.shape)} != labels {tuple(labels.shape)}")
        labels = labels.to(logits.device).float()
        known = ~torch.isnan(labels)  # (B, F)
        per_entry = F.binary_cross_entropy_with_logits(logits.float(), labels.nan_to_num(0.0), reduction="none")
        return (per_entry * known).sum() / known.sum().clamp_min(1)


TERMS = ("global", "region", "step", "local", "segmentation", "finding")


class MultiLevelLoss(nn.Module):
    """Weighted sum of the multi-level objectives; only terms with a positive weight are built and computed.

    Terms (inputs of `forward` in brackets):

    - ``global``: `ContrastiveInfoNCELoss`, CLIP arXiv:2103.00020 (``image_emb``, ``text_emb``, ``group_ids``);
    - ``region``: `RegionSentenceLoss`, fVLM arXiv:2501.14548 (``region_emb``, ``region_text_emb``,
      ``region_valid``, ``region_text_keys``, ``region_is_normal``);
    - ``step``: `StepRegionLoss` (``step_emb``, ``step_item``, ``step_regions``, ``step_region_emb``,
      ``step_region_present``);
    - ``local``: `LocalAlignmentLoss`, FILIP arXiv:2111.07783 (``local_emb``, ``token_emb``, ``token_mask``,
      ``local_group_ids``, or ``group_ids`` when the local inputs are not gathered as the global ones are);
    - ``segmentation``: `SegmentationLoss` (``segmentation_logits``, ``patch_to_region``, ``background_fraction``);
    - ``finding``: `FindingLoss` (``finding_logits``, ``finding_labels``).

    All contrastive terms share ``logit_scale``. Inputs of disabled terms are ignored and may be
    ``None``; check `enabled` before computing them (text tokens, step embeddings, head outputs).

    Args:
        global_weight, region_weight, step_weight, local_weight, segmentation_weight, finding_weight:
            non-negative weights; 0 disables the term. Defaults are the seed configuration (global only).

    Returns:
        ``forward`` returns ``{"loss": sum of weight * term, <term>: unweighted term value}`` for each
        enabled term, all 0-dim tensors attached to the graph (detach them for logging).

    Raises:
        ValueError: a negative (or NaN) weight, no positive weight, or ``None`` for an input of an
        enabled term (naming the term and the inputs), plus each term's own errors.
    """

    def __init__(
        self,
        global_weight: float = 1.0,
        region_weight: float = 0.0,
        step_weight: float = 0.0,
        local_weight: float = 0.0,
        segmentation_weight: float = 0.0,
        finding_weight: float = 0.0,
    ) -> None:
        super().__init__()
        weights = (global_weight, region_weight, step_weight, local_weight, segmentation_weight, finding_weight)
        for name, weight in zip(TERMS, weights):
            if not float(weight) >= 0:
                raise ValueError(f"{name}_weight must be >= 0, got {weight}")
        self.weights = {name: float(w) for name, w in zip(TERMS, weights) if float(w) > 0}
        if not self.weights:
            raise ValueError("MultiLevelLoss needs at least one positive weight")
        losses = {
            "global": ContrastiveInfoNCELoss,
            "region": RegionSentenceLoss,
            "step": StepRegionLoss,
            "local": LocalAlignmentLoss,
            "segmentation": SegmentationLoss,
            "finding": FindingLoss,
        }
        self.terms = nn.ModuleDict({name: losses[name]() for name in self.weights})

    @property
    def enabled(self) -> tuple[str, ...]:
        """Names of the terms with a positive weight, in `TERMS` order."""
        return tuple(self.weights)

    def forward(
        self,
        *,
        logit_scale: torch.Tensor,
        image_emb: torch.Tensor | None = None,
        text_emb: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        region_emb: torch.Tensor | None = None,
        region_text_emb: torch.Tensor | None = None,
        region_valid: torch.Tensor | None = None,
        region_text_keys: torch.Tensor | None = None,
        region_is_normal: torch.Tensor | None = None,
        step_emb: torch.Tensor | None = None,
        step_item: torch.Tensor | None = None,
        step_regions: torch.Tensor | None = None,
        step_region_emb: torch.Tensor | None = None,
        step_region_present: torch.Tensor | None = None,
        local_emb: torch.Tensor | None = None,
        token_emb: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        local_group_ids: torch.Tensor | None = None,
        segmentation_logits: torch.Tensor | None = None,
        patch_to_region: torch.Tensor | None = None,
        background_fraction: torch.Tensor | None = None,
        finding_logits: torch.Tensor | None = None,
        finding_labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        out = {}
        if "global" in self.weights:
            self._require("global", {"image_emb": image_emb, "text_emb": text_emb})
            out["global"] = self.terms["global"](image_emb, text_emb, logit_scale, group_ids)
        if "region" in self.weights:
            self._require(
                "region",
                {
                    "region_emb": region_emb,
                    "region_text_emb": region_text_emb,
                    "region_valid": region_valid,
                    "region_text_keys": region_text_keys,
                    "region_is_normal": region_is_normal,
                },
            )
            out["region"] = self.terms["region"](
                region_emb, region_text_emb, region_valid, region_text_keys, region_is_normal, logit_scale
            )
        if "step" in self.weights:
            self._require(
                "step",
                {
                    "step_emb": step_emb,
                    "step_item": step_item,
                    "step_regions": step_regions,
                    "step_region_emb": step_region_emb,
                    "step_region_present": step_region_present,
                },
            )
            out["step"] = self.terms["step"](
                step_emb, step_item, step_regions, step_region_emb, step_region_present, logit_scale
            )
        if "local" in self.weights:
            self._require("local", {"local_emb": local_emb, "token_emb": token_emb, "token_mask": token_mask})
            local_groups = local_group_ids if local_group_ids is not None else group_ids
            out["local"] = self.terms["local"](local_emb, token_emb, token_mask, logit_scale, local_groups)
        if "segmentation" in self.weights:
            self._require(
                "segmentation",
                {
                    "segmentation_logits": segmentation_logits,
                    "patch_to_region": patch_to_region,
                    "background_fraction": background_fraction,
                },
            )
            out["segmentation"] = self.terms["segmentation"](segmentation_logits, patch_to_region, background_fraction)
        if "finding" in self.weights:
            self._require("finding", {"finding_logits": finding_logits, "finding_labels": finding_labels})
            out["finding"] = self.terms["finding"](finding_logits, finding_labels)
        total = sum(self.weights[name] * value for name, value in out.items())
        return {"loss": total, **out}

    def _require(self, term: str, inputs: dict[str, torch.Tensor | None]) -> None:
        missing = [name for name, value in inputs.items() if value is None]
        if missing:
            raise ValueError(f"the {term} term (weight {self.weights[term]}) needs {missing}, got None")
