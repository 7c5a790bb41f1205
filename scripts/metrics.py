"""Retrieval metrics: Recall@K between CT and report embeddings, as an Ignite metric."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.metrics import Metric

from .losses import positive_groups

DIRECTIONS = ("image_to_text", "text_to_image")


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Fraction of queries with at least one relevant item among their ``k`` most similar.

    Args:
        similarity: ``(Q, M)`` query-by-candidate scores (higher is closer).
        relevant: ``(Q, M)`` bool, which candidates count as a hit for each query.
        k: cut-off; clipped to ``M``.
    """
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices  # (Q, k)
    return relevant.gather(1, top).any(1).float().mean().item()


def chance_recall_at_k(relevant: torch.Tensor, k: int) -> float:
    """Expected Recall@K of a uniformly random ranking: mean over queries of ``1 - C(M - g, k) / C(M, k)``.

    ``g`` is the query's number of relevant candidates among ``M``. This is the level a model must beat.
    """
    m = relevant.shape[1]
    k = min(k, m)
    misses = [math.comb(m - int(g), k) / math.comb(m, k) for g in relevant.sum(1).tolist()]
    return 1.0 - sum(misses) / len(misses)


class RetrievalRecall(Metric):
    """Mean Recall@K over the cut-offs ``ks`` and retrieval ``directions`` of one evaluation pass.

    Each iteration's output gives ``(image_embedding (B, E), text_embedding (B, E), keys (B, 2))``
    (keys from `scripts.losses.pair_keys`). At the end, the similarity of every image to every text of
    the pass decides the ranking; a text counts as a hit for an image (and the other way) when both
    belong to one group: same study or identical report, so duplicates are never counted as misses.
    With ``chance=True`` the metric reports the expected value of a random ranking instead, the
    baseline to beat.

    Args:
        ks: cut-offs ``K``.
        directions: subset of ``("image_to_text", "text_to_image")``.
        chance: report the random-ranking expectation.
        output_transform: maps the engine output to the triple above.
        device: where the accumulated embeddings live.

    Raises:
        ValueError: an unknown direction or an empty ``ks``.
    """

    def __init__(
        self,
        ks: Sequence[int] = (1, 5),
        directions: Sequence[str] = DIRECTIONS,
        chance: bool = False,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        if not ks or set(directions) - set(DIRECTIONS) or not directions:
            raise ValueError(f"ks must be non-empty and directions from {DIRECTIONS}, got {ks}, {directions}")
        self.ks = tuple(int(k) for k in ks)
        self.directions = tuple(directions)
        self.chance = chance
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._image, self._text, self._keys = [], [], []

    def update(self, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        image, text, keys = output
        self._image.append(image.detach().float().to(self._device))
        self._text.append(text.detach().float().to(self._device))
        self._keys.append(keys.to(self._device))

    def compute(self) -> float:
        if not self._image:
            raise RuntimeError("RetrievalRecall needs at least one update before compute")
        image = idist.all_gather(torch.cat(self._image))  # (M, E)
        text = idist.all_gather(torch.cat(self._text))  # (M, E)
        groups = positive_groups(idist.all_gather(torch.cat(self._keys)))  # (M,)
        relevant = groups[:, None] == groups[None, :]  # (M, M), symmetric
        similarity = image @ text.T  # (images, texts)
        values = []
        for direction in self.directions:
            sim = similarity if direction == "image_to_text" else similarity.T
            for k in self.ks:
                values.append(chance_recall_at_k(relevant, k) if self.chance else recall_at_k(sim, relevant.to(sim.device), k))
        return sum(values) / len(values)
