"""Evaluation metrics of the bundle: retrieval, zero-shot classification, region grounding, CoT alignment.

Every report function takes the tensors of a whole evaluation set and returns a JSON-serialisable
dict. A number the data cannot define is ``{"value": None, "reason": "..."}``, never a made-up value.

DDP: `gather_cases` and `CaseAccumulator` collect per-iteration rows from every rank (shards of
unequal length, cases repeated by `DistributedSampler` padding) into one de-duplicated set sorted by
case index, so a 2-process evaluation gives the numbers of a 1-process one. `RetrievalEvaluation` and
`ZeroShotEvaluation` wrap this for an Ignite evaluator; `RetrievalRecall` is the training-time
validation metric (mean Recall@K, a scalar for checkpoint selection).

Protocols (details in each function's docstring):

- retrieval: CT-CLIP (Hamamci et al., arXiv:2403.17834) report-to-volume and volume-to-volume
  retrieval, extended with group relevance (same study or identical report is one hit) and explicit
  tie handling (McSherry & Najork, ECIR 2008);
- zero-shot classification: CT-CLIP's prompt pair and softmax, CT-CLIP's threshold rule and weighted
  F1 (``scripts/bootstrap_values.py`` of github.com/ibrahimethemhamamci/CT-CLIP, also used by fVLM,
  Shui et al., ICLR 2025, for its 16-finding table), with a bootstrap that really resamples;
- region grounding and text-to-patch maps: token-wise similarity as in FILIP (arXiv:2111.07783);
- chain-of-thought alignment: step-to-region accuracy and a concordance index of the steps'
  cranio-caudal order (Harrell's C).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence

import ignite.distributed as idist
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.metrics import Metric
from sklearn.metrics import roc_auc_score, roc_curve

from .data.ctrate import FINDINGS
from .losses import positive_groups, segmentation_targets

DIRECTIONS = ("image_to_text", "text_to_image")

# the 18 CT-RATE abnormality columns, in the labels CSV's order (CT-CLIP zero_shot.py uses the same list)
CT_RATE_FINDINGS = FINDINGS
# fVLM's table leaves out the two findings it cannot tie to one organ
FVLM_FINDINGS = tuple(f for f in CT_RATE_FINDINGS if f not in ("Medical material", "Lymphadenopathy"))
CT_RATE_MACRO_SUBSETS = {"ct_clip_18": CT_RATE_FINDINGS, "fvlm_16": FVLM_FINDINGS}
# (present, absent) prompt templates; CT-CLIP zero_shot.py uses exactly this pair
CT_CLIP_TEMPLATES = (("{finding} is present.", "{finding} is not present."),)

RETRIEVAL_KS = (1, 5, 10, 50, 100)
TIE_MODES = ("mean", "pessimistic", "optimistic")
# threshold method -> the rule that turns a probability into "present"
THRESHOLD_RULES = {"ct_clip": ">", "youden": ">=", "fixed": ">"}
# where a finding's threshold cannot be chosen: the fixed threshold of the peers' softmax-pair convention
FALLBACK_THRESHOLD = 0.5
CLASSIFICATION_METRICS = ("auroc", "f1", "f1_positive", "accuracy", "precision", "sensitivity", "specificity")


def _entry(value: float | None, reason: str | None = None) -> dict:
    """``{"value": float}`` or, for an undefined number, ``{"value": None, "reason": reason}``."""
    if value is None:
        return {"value": None, "reason": reason}
    return {"value": float(value)}


# ----------------------------------------------------------------------------------------------------
# gathering across DDP ranks
# ----------------------------------------------------------------------------------------------------


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate ``x (B_rank, ...)`` of every rank in rank order; shards may differ in length."""
    wire = x.to(torch.uint8) if x.dtype == torch.bool else x  # gloo has no bool collectives
    padded = torch.cat([wire, wire.new_zeros((max(sizes) - wire.shape[0], *wire.shape[1:]))])  # (max B, ...)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    out = torch.cat([part[:n] for part, n in zip(parts, sizes)])  # (sum B, ...)
    return out.to(torch.bool) if x.dtype == torch.bool else out


def gather_cases(key: torch.Tensor, values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gather per-case rows from every DDP rank, keep each case once and sort by key.

    Ranks may hold different numbers of rows (uneven shards), and `DistributedSampler` repeats cases
    to pad the last shard: rows are concatenated in rank order, then only the first row of each key is
    kept. Every rank returns the same result, equal to what one process that saw each case once
    returns. Without an initialised process group (or with one rank) it only de-duplicates and sorts.

    Args:
        key: ``(B,)`` or ``(B, k)`` int64 key of each row on this rank: the dataset index of the case,
            or ``(case index, step index)`` for per-step rows.
        values: name -> ``(B, ...)`` tensor. Trailing shapes and dtypes must agree across ranks; tensors
            must live where the backend gathers (CPU for gloo, CUDA for nccl).

    Returns:
        ``(key (M,) | (M, k), values name -> (M, ...))`` sorted ascending by key (lexicographic).

    Raises:
        ValueError: a value whose first dimension differs from ``key``'s.
    """
    for name, v in values.items():
        if v.shape[0] != key.shape[0]:
            raise ValueError(f"gather_cases: {name!r} has {v.shape[0]} rows but key has {key.shape[0]}")
    if _is_distributed():
        count = torch.tensor([key.shape[0]], device=key.device)
        counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(counts, count)
        sizes = [int(c.item()) for c in counts]
        key = _all_gather_rows(key, sizes)
        values = {name: _all_gather_rows(v, sizes) for name, v in values.items()}
    unique, inverse = torch.unique(key, dim=0, return_inverse=True)  # sorted rows
    positions = torch.arange(key.shape[0], device=key.device)
    first = torch.full((unique.shape[0],), key.shape[0], dtype=torch.long, device=key.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")  # (M,): first row of each key
    return unique, {name: v[first] for name, v in values.items()}


class CaseAccumulator:
    """Collects rows keyed by case over an evaluation pass; `gather` runs `gather_cases` once at the end.

    Each `update` appends ``key (B,) | (B, k)`` and a fixed set of named ``(B, ...)`` tensors (detached,
    moved to ``device``). A rank that received no rows still takes part in `gather`: the shapes and
    dtypes of the other ranks' tensors are exchanged first.

    Args:
        device: where rows are stored and gathered (``"cpu"`` for gloo, the rank's CUDA device for nccl).

    Raises:
        ValueError: an update whose names differ from the first update's; `gather` when no rank has rows.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self._keys: list[torch.Tensor] = []
        self._values: dict[str, list[torch.Tensor]] = {}

    def update(self, key: torch.Tensor, values: Mapping[str, torch.Tensor]) -> None:
        if self._keys and set(values) != set(self._values):
            raise ValueError(f"CaseAccumulator: update names {sorted(values)} differ from {sorted(self._values)}")
        self._keys.append(torch.as_tensor(key).detach().long().to(self.device))
        for name, v in values.items():
            self._values.setdefault(name, []).append(torch.as_tensor(v).detach().to(self.device))

    def gather(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(key (M,) | (M, k), name -> (M, ...))`` over all ranks, de-duplicated, sorted by key."""
        layout = None
        if self._keys:
            layout = (self._keys[0].shape[1:], {name: (v[0].shape[1:], v[0].dtype) for name, v in self._values.items()})
        if _is_distributed():
            layouts = [None] * dist.get_world_size()
            dist.all_gather_object(layouts, layout)
            layout = next((item for item in layouts if item is not None), None)
        if layout is None:
            raise ValueError("CaseAccumulator.gather: no rank received any update")
        if self._keys:
            key = torch.cat(self._keys)
            values = {name: torch.cat(parts) for name, parts in self._values.items()}
        else:  # this rank's shard was empty
            key = torch.empty((0, *layout[0]), dtype=torch.long, device=self.device)
            values = {
                name: torch.empty((0, *shape), dtype=dtype, device=self.device)
                for name, (shape, dtype) in layout[1].items()
            }
        return gather_cases(key, values)


# ----------------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------------


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    """Fraction of queries with at least one relevant item among their ``k`` most similar.

    Ties are broken by `torch.topk` (arbitrarily); `retrieval_metrics` handles ties explicitly.

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


def _comb_ratio(a: torch.Tensor, b: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """Elementwise ``C(a, k) / C(b, k)`` in float64 for ``0 <= a <= b``: 0 where ``k > a``, 1 where ``k <= 0``.

    It is the probability that ``k`` items drawn without replacement from ``b`` all come from a subset
    of ``a``; computed with log-gamma so that pools of thousands do not overflow.
    """
    a, b = a.double(), b.double()
    k = torch.as_tensor(k, dtype=torch.float64).expand_as(a)
    defined = k <= a
    safe_k = torch.where(defined, k, torch.zeros_like(k))
    log_ratio = torch.lgamma(a + 1) - torch.lgamma(a - safe_k + 1) - torch.lgamma(b + 1) + torch.lgamma(b - safe_k + 1)
    ratio = torch.where(defined, log_ratio.exp(), torch.zeros_like(a))
    return torch.where(k <= 0, torch.ones_like(a), ratio)


def _tie_counts(similarity: torch.Tensor, relevant: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-query counts ``(Q,)`` that decide rank and recall under every tie mode.

    ``higher``: candidates scoring strictly above the best relevant one (all irrelevant);
    ``tied_irrelevant`` / ``tied_relevant``: candidates scoring exactly the best relevant score;
    ``relevant``: relevant candidates; ``candidates``: pool size.
    """
    best = torch.where(relevant, similarity, torch.full_like(similarity, -math.inf)).max(1).values  # (Q,)
    above = similarity > best[:, None]  # (Q, C)
    tied = similarity == best[:, None]  # (Q, C)
    return {
        "higher": above.sum(1),
        "tied_irrelevant": (tied & ~relevant).sum(1),
        "tied_relevant": (tied & relevant).sum(1),
        "relevant": relevant.sum(1),
        "candidates": torch.full_like(best, similarity.shape[1], dtype=torch.long),
    }


def _ranks(counts: Mapping[str, torch.Tensor], tie_mode: str) -> torch.Tensor:
    """Rank ``(Q,)`` float64 of the best relevant candidate (1 = first) under ``tie_mode``."""
    higher, t, r = counts["higher"].double(), counts["tied_irrelevant"].double(), counts["tied_relevant"].double()
    if tie_mode == "optimistic":
        return 1 + higher
    if tie_mode == "pessimistic":
        return 1 + higher + t
    return 1 + higher + t / (r + 1)  # expected position of the first relevant among t + r shuffled ties


def _hits(counts: Mapping[str, torch.Tensor], k: int, tie_mode: str) -> torch.Tensor:
    """Per-query hit ``(Q,)`` float64 at cut-off ``k``: 0/1, or its probability for ``tie_mode="mean"``."""
    if tie_mode != "mean":
        return (_ranks(counts, tie_mode) <= k).double()
    higher, t, r = counts["higher"], counts["tied_irrelevant"], counts["tied_relevant"]
    slots = (k - higher).clamp(min=0)  # places left in the top k for the tied block
    # miss = the first `slots` of the shuffled tied block are all irrelevant
    return 1 - _comb_ratio(t, t + r, slots)


def retrieval_ranks(similarity: torch.Tensor, relevant: torch.Tensor, tie_mode: str = "mean") -> torch.Tensor:
    """Rank of each query's best-scoring relevant candidate, with explicit tie handling.

    ``rank = 1 + h + tie term``, with ``h`` the number of candidates scoring strictly higher than the
    best relevant candidate, ``t`` the irrelevant and ``r`` (>= 1) the relevant candidates scoring exactly
    that best score:

    - ``"optimistic"``: tie term 0 (ties resolved in the query's favour);
    - ``"pessimistic"``: tie term ``t`` (every tied irrelevant candidate ranked first);
    - ``"mean"``: tie term ``t / (r + 1)``, the expected number of irrelevant items before the first
      relevant one when the tied block is shuffled uniformly (McSherry & Najork, ECIR 2008). A model
      that gives every candidate one score gets the chance level, not a perfect score.

    Args:
        similarity: ``(Q, C)`` query-by-candidate scores (higher is closer).
        relevant: ``(Q, C)`` bool, the query's group (same study or identical report).
        tie_mode: one of ``TIE_MODES``.

    Returns:
        ``(Q,)`` float64 ranks, 1 = the relevant item is first.

    Raises:
        ValueError: unknown ``tie_mode``, shapes differ, or a query without a relevant candidate.
    """
    _check_retrieval_inputs(similarity, relevant, tie_mode)
    return _ranks(_tie_counts(similarity, relevant), tie_mode)


def _check_retrieval_inputs(similarity: torch.Tensor, relevant: torch.Tensor, tie_mode: str) -> None:
    if tie_mode not in TIE_MODES:
        raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {tie_mode!r}")
    if similarity.shape != relevant.shape or similarity.ndim != 2:
        raise ValueError(
            f"similarity {tuple(similarity.shape)} and relevant {tuple(relevant.shape)} must be one (Q, C) shape"
        )
    missing = int((~relevant.any(1)).sum())
    if missing:
        raise ValueError(f"{missing} of {relevant.shape[0]} queries have no relevant candidate in their pool")


def _cosine_scores(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(Q, E), (C, E) -> (Q, C)`` scores of unit vectors, computed once per distinct row so that equal
    embeddings (duplicate reports, a collapsed model) give bitwise-equal scores: exact ties stay ties."""
    unique_image, image_row = torch.unique(image, dim=0, return_inverse=True)
    unique_text, text_row = torch.unique(text, dim=0, return_inverse=True)
    return (unique_image @ unique_text.T)[image_row][:, text_row]  # (Q', C') -> (Q, C)


def select_one_per_study(study_ids: Sequence[Hashable], case_ids: Sequence) -> list[int]:
    """Positions of one item per study: the one with the smallest case id; the list is sorted by case id.

    This is the "one volume per scan" pool of CT-CLIP's retrieval protocol: CT-RATE stores several
    reconstructions of a scan (``valid_53_a_1``, ``valid_53_a_2``), and with scan ids as ``study_ids``
    and volume names as ``case_ids`` the first reconstruction is kept. The choice depends only on the
    ids, not on the order in which DDP ranks delivered the items. Case ids compare as given (strings
    lexicographically, numbers numerically); equal case ids keep the earlier position.

    Args:
        study_ids: ``M`` study (scan) ids, e.g. the study keys ``keys[:, 0]`` of `scripts.losses.pair_keys`.
        case_ids: ``M`` case ids, e.g. volume names or dataset indices.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(study_ids) != len(case_ids):
        raise ValueError(f"{len(study_ids)} study ids but {len(case_ids)} case ids")
    chosen: dict[Hashable, int] = {}
    for pos in sorted(range(len(case_ids)), key=lambda i: (case_ids[i], i)):
        chosen.setdefault(study_ids[pos], pos)
    return sorted(chosen.values(), key=lambda i: (case_ids[i], i))


def _direction_report(counts: Mapping[str, torch.Tensor], ks: Sequence[int], tie_mode: str) -> dict:
    """Recall@K, ranks, chance levels and the recall curve of one direction from pooled per-query counts."""
    candidates = int(counts["candidates"][0])
    g, c = counts["relevant"], counts["candidates"]
    out: dict = {}
    for k in ks:
        if k >= candidates:
            out[f"recall@{k}"] = _entry(None, f"K={k} >= {candidates} candidates per pool: every query is a hit")
        else:
            out[f"recall@{k}"] = _entry(_hits(counts, k, tie_mode).mean().item())
    ranks = _ranks(counts, tie_mode).numpy()
    out["mean_rank"] = _entry(float(ranks.mean()))
    out["median_rank"] = _entry(float(np.median(ranks)))
    out["chance"] = {
        **{f"recall@{k}": _entry((1 - _comb_ratio(c - g, c, k)).mean().item()) for k in ks if k < candidates},
        "mean_rank": _entry(((c + 1).double() / (g + 1).double()).mean().item()),
    }
    curve_ks = list(range(1, min(max(ks), candidates) + 1))
    out["recall_curve"] = {
        "k": curve_ks,
        "recall": [_hits(counts, k, tie_mode).mean().item() for k in curve_ks],
        "chance": [(1 - _comb_ratio(c - g, c, k)).mean().item() for k in curve_ks],
    }
    return out


def retrieval_metrics(
    image_embedding: torch.Tensor,
    text_embedding: torch.Tensor,
    group_ids: torch.Tensor,
    ks: Sequence[int] = RETRIEVAL_KS,
    tie_mode: str = "mean",
    pool_size: int | None = None,
    seed: int = 0,
) -> dict:
    """Image-to-report and report-to-image retrieval: Recall@K, mean and median rank, chance levels.

    Protocol (CT-CLIP, arXiv:2403.17834, ``scripts/report_to_volume*.py``): cosine similarity between
    every query and every candidate of the pool; a query is a hit at ``K`` when a relevant candidate is
    among its ``K`` best. Differences from CT-CLIP's script, all explicit here: relevance is by group
    (``group_ids`` from `scripts.losses.positive_groups`: same study or identical report count as one,
    so duplicate reports are never misses), and ties follow ``tie_mode`` (see `retrieval_ranks`; CT-CLIP
    breaks ties by candidate index). With ``tie_mode="mean"`` Recall@K is the probability of a hit when
    tied blocks are shuffled. Build the pool with `select_one_per_study` for the "one volume per scan"
    protocol (1,564 CT-RATE validation scans).

    ``pool_size=None`` ranks against the whole set. Otherwise the items are shuffled (``seed``) and cut
    into ``M // pool_size`` pools of exactly ``pool_size`` pairs, each query ranked within its pool; the
    ``M % pool_size`` left-over pairs are not evaluated and are counted in ``protocol``.

    Recall@K with ``K`` >= the pool size is ``null`` (every query would be a hit). The median is
    `numpy.median` (mean of the two middle ranks for an even count). Chance levels: Recall@K
    ``1 - C(C - g, K) / C(C, K)``, mean rank ``(C + 1) / (g + 1)`` for ``g`` relevant among ``C``.

    Args:
        image_embedding: ``(M, E)`` image embeddings (normalised here).
        text_embedding: ``(M, E)`` report embeddings, row ``i`` paired with image ``i``.
        group_ids: ``(M,)`` int group of each pair.
        ks: cut-offs ``K``.
        tie_mode: one of ``TIE_MODES``.
        pool_size: candidates per pool, or ``None`` for the whole set.
        seed: shuffle seed of the pools.

    Returns:
        ``{"protocol": {...}, "image_to_text": report, "text_to_image": report}`` where a report holds
        ``"recall@K"``, ``"mean_rank"``, ``"median_rank"`` entries (``{"value": float | None, "reason"}``),
        ``"chance"`` (same keys) and ``"recall_curve"`` (``{"k": [...], "recall": [...], "chance": [...]}``).

    Raises:
        ValueError: shapes differ, ``pool_size`` < 2 or larger than ``M``, unknown ``tie_mode``, empty ``ks``.
    """
    m = image_embedding.shape[0]
    if text_embedding.shape != image_embedding.shape or group_ids.shape != (m,):
        raise ValueError(
            f"image {tuple(image_embedding.shape)}, text {tuple(text_embedding.shape)} and group ids "
            f"{tuple(group_ids.shape)} must be (M, E), (M, E), (M,)"
        )
    if tie_mode not in TIE_MODES or not ks:
        raise ValueError(f"tie_mode must be one of {TIE_MODES} and ks non-empty, got {tie_mode!r}, {ks}")
    if pool_size is not None and not 2 <= pool_size <= m:
        raise ValueError(f"pool_size must be in [2, {m}] (the number of pairs), got {pool_size}")
    image = F.normalize(image_embedding.detach().double().cpu(), dim=-1)
    text = F.normalize(text_embedding.detach().double().cpu(), dim=-1)
    groups = group_ids.cpu()
    if pool_size is None:
        pools = torch.arange(m)[None]  # (1, M)
    else:
        order = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
        pools = order[: (m // pool_size) * pool_size].view(-1, pool_size)  # (P, pool_size)
    per_direction: dict[str, list[dict]] = {d: [] for d in DIRECTIONS}
    for pool in pools:
        similarity = _cosine_scores(image[pool], text[pool])  # (C, C): rows images, columns texts
        relevant = groups[pool][:, None] == groups[pool][None, :]  # (C, C), symmetric
        for direction, sim in zip(DIRECTIONS, (similarity, similarity.T)):
            _check_retrieval_inputs(sim, relevant, tie_mode)
            per_direction[direction].append(_tie_counts(sim, relevant))
    report: dict = {
        "protocol": {
            "tie_mode": tie_mode,
            "pool_size": int(pools.shape[1]),
            "pools": int(pools.shape[0]),
            "pairs_evaluated": int(pools.numel()),
            "pairs_left_out": int(m - pools.numel()),
            "relevance": "same group (same study or identical report)",
        }
    }
    for direction, parts in per_direction.items():
        counts = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}  # (Q,) each
        report[direction] = _direction_report(counts, [int(k) for k in ks], tie_mode)
    return report


def study_retrieval(
    case_index: torch.Tensor,
    image_embedding: torch.Tensor,
    text_embedding: torch.Tensor,
    keys: torch.Tensor,
    ks: Sequence[int] = RETRIEVAL_KS,
    tie_mode: str = "mean",
    one_per_study: bool = True,
    pool_size: int | None = None,
    seed: int = 0,
) -> tuple[dict, list[int], torch.Tensor]:
    """`retrieval_metrics` over the cases of an evaluation, one volume per study when asked (CT-CLIP).

    Args:
        case_index: ``(M,)`` case keys (sorted, as `gather_cases` returns them).
        image_embedding, text_embedding: ``(M, E)``.
        keys: ``(M, 2)`` study and report keys (`scripts.losses.pair_keys`).
        ks, tie_mode, pool_size, seed: as `retrieval_metrics`; a ``pool_size`` larger than the number
            of kept pairs falls back to the whole set.
        one_per_study: keep the lowest case index of each study (`select_one_per_study`).

    Returns:
        ``(report, kept row positions, group ids of the kept rows)``; the report's ``protocol`` also
        records ``cases`` and ``one_per_study``.
    """
    if one_per_study:
        keep = select_one_per_study(keys[:, 0].tolist(), case_index.tolist())
    else:
        keep = list(range(case_index.shape[0]))
    rows = torch.tensor(keep, dtype=torch.long)
    groups = positive_groups(keys[rows])
    pool = pool_size if pool_size is None or pool_size <= len(keep) else None
    report = retrieval_metrics(image_embedding[rows], text_embedding[rows], groups, ks, tie_mode, pool, seed)
    report["protocol"].update(cases=int(case_index.shape[0]), one_per_study=one_per_study)
    return report, keep, groups


class RetrievalRecall(Metric):
    """Mean Recall@K over the cut-offs ``ks`` and retrieval ``directions`` of one evaluation pass.

    Each iteration's output gives ``(image_embedding (B, E), text_embedding (B, E), keys (B, 2))``
    (keys from `scripts.losses.pair_keys`), optionally followed by ``case_index (B,)``. At the end, the
    similarity of every image to every text of the pass decides the ranking; a text counts as a hit for
    an image (and the other way) when both belong to one group: same study or identical report, so
    duplicates are never counted as misses. With ``case_index``, rows repeated by `DistributedSampler`
    padding are counted once (`gather_cases`); without it every gathered row counts. With
    ``chance=True`` the metric reports the expected value of a random ranking instead, the baseline to
    beat. The value is rounded to 1e-6 (a hit among M cases moves it by at least 1 / (M x cut-offs x
    directions)), so float noise never makes an equal recall a new best.

    Args:
        ks: cut-offs ``K``.
        directions: subset of ``("image_to_text", "text_to_image")``.
        chance: report the random-ranking expectation.
        output_transform: maps the engine output to the triple (or quadruple) above.
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
        self._image, self._text, self._keys, self._cases = [], [], [], []

    def update(self, output: Sequence[torch.Tensor]) -> None:
        image, text, keys = output[:3]
        self._image.append(image.detach().float().to(self._device))
        self._text.append(text.detach().float().to(self._device))
        self._keys.append(keys.to(self._device))
        if len(output) > 3:
            self._cases.append(output[3].detach().long().to(self._device))

    def compute(self) -> float:
        if not self._image:
            raise RuntimeError("RetrievalRecall needs at least one update before compute")
        if self._cases:
            values = {"image": torch.cat(self._image), "text": torch.cat(self._text), "keys": torch.cat(self._keys)}
            _, values = gather_cases(torch.cat(self._cases), values)
            image, text, keys = values["image"], values["text"], values["keys"]
        else:
            image = idist.all_gather(torch.cat(self._image))  # (M, E)
            text = idist.all_gather(torch.cat(self._text))  # (M, E)
            keys = idist.all_gather(torch.cat(self._keys))  # (M, 2)
        groups = positive_groups(keys)  # (M,)
        relevant = groups[:, None] == groups[None, :]  # (M, M), symmetric
        similarity = image @ text.T  # (images, texts)
        values = []
        for direction in self.directions:
            sim = similarity if direction == "image_to_text" else similarity.T
            for k in self.ks:
                values.append(
                    chance_recall_at_k(relevant, k) if self.chance else recall_at_k(sim, relevant.to(sim.device), k)
                )
        # float32 sums over tied scores differ in the last bits from pass to pass; rounding to 1e-6 (far below
        # one hit, 1 / M) keeps an unchanged ranking from counting as a new best checkpoint
        return round(float(sum(values) / len(values)), 6)


# ----------------------------------------------------------------------------------------------------
# zero-shot multi-abnormality classification
# ----------------------------------------------------------------------------------------------------


def prompt_texts(findings: Sequence[str], templates: Sequence[tuple[str, str]]) -> list[str]:
    """The ``K * 2 * T`` prompts in ``(finding, present/absent, template)`` order (row-major).

    Each template is a ``(present, absent)`` pair with a ``{finding}`` field, e.g. `CT_CLIP_TEMPLATES`.

    Raises:
        ValueError: no findings or templates, or a template that is not a pair.
    """
    if not findings or not templates or any(len(t) != 2 for t in templates):
        raise ValueError(
            f"need findings and (present, absent) template pairs, got {len(findings)} findings, {templates}"
        )
    return [templates[t][p].format(finding=f) for f in findings for p in range(2) for t in range(len(templates))]


def prompt_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor],
    findings: Sequence[str] = CT_RATE_FINDINGS,
    templates: Sequence[tuple[str, str]] = CT_CLIP_TEMPLATES,
) -> torch.Tensor:
    """Embed the zero-shot prompts: ``(K, 2, T, E)`` = (finding, present/absent, template, width).

    Args:
        encode_text: maps a list of ``n`` strings to ``(n, E)`` embeddings (e.g. the CLIP model's text
            tower with its projection, in eval mode, under ``torch.no_grad``).
        findings: the ``K`` finding names (CT-RATE column names).
        templates: ``T`` ``(present, absent)`` template pairs.

    Raises:
        ValueError: ``encode_text`` returns a number of rows other than ``K * 2 * T``.
    """
    texts = prompt_texts(findings, templates)
    emb = encode_text(texts)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(
            f"encode_text returned {tuple(emb.shape)} for {len(texts)} prompts, expected ({len(texts)}, E)"
        )
    return emb.reshape(len(findings), 2, len(templates), emb.shape[1])  # (K*2*T, E) -> (K, 2, T, E)


def ensemble_prompts(prompt_embedding: torch.Tensor) -> torch.Tensor:
    """Average the templates: ``(K, 2, T, E) -> (K, 2, E)``, unit length (CLIP prompt ensembling,
    arXiv:2103.00020 sec. 3.1.4: mean of the normalised embeddings, normalised again)."""
    if prompt_embedding.ndim != 4 or prompt_embedding.shape[1] != 2:
        raise ValueError(f"prompt embeddings must be (K, 2, T, E), got {tuple(prompt_embedding.shape)}")
    return F.normalize(F.normalize(prompt_embedding.float(), dim=-1).mean(2), dim=-1)  # (K, 2, T, E) -> (K, 2, E)


def zero_shot_probabilities(
    image_embedding: torch.Tensor, prompt_embedding: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Probability that each finding is present: softmax over the (present, absent) prompt pair.

    CT-CLIP protocol (arXiv:2403.17834; ``scripts/zero_shot.py``): logits are ``logit_scale`` times the
    cosine similarity of the image to "{finding} is present." and to "{finding} is not present.",
    the softmax over the pair gives the probability of "present". With several templates the prompt
    embeddings are ensembled first (`ensemble_prompts`). AUROC does not depend on ``logit_scale``;
    thresholded metrics do, so pass the model's learned scale (CT-CLIP uses its ``temperature.exp()``).

    Args:
        image_embedding: ``(M, E)`` global image embeddings.
        prompt_embedding: ``(K, 2, T, E)`` from `prompt_embeddings`.
        logit_scale: the model's logit scale (inverse temperature), a positive number.

    Returns:
        ``(M, K)`` float32 probabilities in ``[0, 1]``.

    Raises:
        ValueError: embedding widths differ or ``prompt_embedding`` is not ``(K, 2, T, E)``.
    """
    text = ensemble_prompts(prompt_embedding).to(image_embedding.device)  # (K, 2, E)
    if image_embedding.ndim != 2 or image_embedding.shape[1] != text.shape[-1]:
        raise ValueError(
            f"image embeddings {tuple(image_embedding.shape)} do not match prompts {tuple(prompt_embedding.shape)}"
        )
    image = F.normalize(image_embedding.float(), dim=-1)
    logits = float(logit_scale) * torch.einsum("me,kpe->mkp", image, text)  # (M, K, 2)
    return logits.softmax(-1)[..., 0]  # (M, K)


def _ct_clip_threshold(probability: np.ndarray, label: np.ndarray) -> float:
    """CT-CLIP's rule: over ``numpy.linspace(0, 1, 100)``, predict ``p > t`` and take the ``t`` closest
    to the ROC corner, ``min sqrt((1 - TPR)^2 + FPR^2)``; among equal distances the largest ``t``."""
    grid = np.linspace(0, 1, 100)
    pred = probability[None, :] > grid[:, None]  # (100, n)
    positive = label[None, :] == 1
    tpr = (pred & positive).sum(1) / positive.sum()
    fpr = (pred & ~positive).sum(1) / (~positive).sum()
    distance = np.sqrt((1 - tpr) ** 2 + fpr**2)
    return float(grid[np.flatnonzero(distance == distance.min())[-1]])


def _youden_threshold(probability: np.ndarray, label: np.ndarray) -> float | None:
    """Youden's J: the `sklearn.metrics.roc_curve` threshold maximising ``TPR - FPR`` (the highest on ties);
    ``None`` when no threshold gives ``J > 0`` (the maximum is then roc_curve's ``+inf`` sentinel, which
    predicts nothing present)."""
    fpr, tpr, thresholds = roc_curve(label, probability)
    youden = tpr - fpr
    best = int(np.argmax(youden))
    if youden[best] <= 0 or not np.isfinite(thresholds[best]):
        return None
    return float(thresholds[best])


def select_threshold(probability: np.ndarray, label: np.ndarray, method: str) -> tuple[float | None, str | None]:
    """Operating threshold of one finding: ``(threshold, None)`` or ``(None, reason)``.

    Methods (decision rule in ``THRESHOLD_RULES``):

    - ``"ct_clip"``: CT-CLIP's ``find_threshold`` in ``scripts/bootstrap_values.py``
      (github.com/ibrahimethemhamamci/CT-CLIP, HEAD a2a155c; fVLM's ``calc_metrics.py`` copies it
      "following CT-CLIP's evaluation protocol"): 100 candidates ``numpy.linspace(0, 1, 100)``, rule
      ``p > t``, the candidate nearest the ROC corner (0, 1), the last one on ties;
    - ``"youden"``: maximise Youden's ``J = TPR - FPR`` over `sklearn.metrics.roc_curve`, rule ``p >= t``;
      when no threshold gives ``J > 0`` (scores that never rank a present case above an absent one) there
      is no threshold to choose: ``(None, reason)``, never roc_curve's ``+inf``;
    - ``"fixed"``: 0.5, rule ``p > t``.

    Where ``None`` is returned, `classification_metrics` falls back to ``FALLBACK_THRESHOLD`` and says so.

    Args:
        probability: ``(n,)`` probabilities of "present".
        label: ``(n,)`` 0/1 labels without NaN.
        method: one of ``THRESHOLD_RULES``.

    Raises:
        ValueError: unknown ``method``.
    """
    if method not in THRESHOLD_RULES:
        raise ValueError(f"threshold method must be one of {tuple(THRESHOLD_RULES)}, got {method!r}")
    if method == "fixed":
        return 0.5, None
    reason = _single_class_reason(label)
    if reason is not None:
        return None, reason
    if method == "ct_clip":
        return _ct_clip_threshold(probability, label), None
    threshold = _youden_threshold(probability, label)
    if threshold is None:
        return None, "Youden's J <= 0 at every threshold: no threshold separates present from absent"
    return threshold, None


def _single_class_reason(label: np.ndarray) -> str | None:
    if label.size == 0:
        return "no labels"
    if not (label == 1).any():
        return "only negative cases"
    if not (label == 0).any():
        return "only positive cases"
    return None


def _binary_metrics(probability: np.ndarray, label: np.ndarray, threshold: float, rule: str) -> dict:
    """All ``CLASSIFICATION_METRICS`` of one finding as ``name -> (value | None, reason | None)``."""
    n = label.size
    if n == 0:
        return {name: (None, "no labels") for name in CLASSIFICATION_METRICS}
    n_pos = int((label == 1).sum())
    n_neg = n - n_pos
    single = _single_class_reason(label)
    out = {"auroc": (float(roc_auc_score(label, probability)), None) if single is None else (None, single)}
    pred = probability > threshold if rule == ">" else probability >= threshold
    positive = label == 1
    tp, fp = int((pred & positive).sum()), int((pred & ~positive).sum())
    fn, tn = n_pos - tp, n_neg - fp
    f1_pos = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
    f1_neg = 2 * tn / (2 * tn + fn + fp) if 2 * tn + fn + fp else 0.0
    out["f1"] = ((n_pos * (f1_pos or 0.0) + n_neg * f1_neg) / n, None)  # support-weighted, as CT-CLIP
    out["f1_positive"] = (f1_pos, None if f1_pos is not None else "no positive cases and no positive predictions")
    out["accuracy"] = ((tp + tn) / n, None)
    out["precision"] = (tp / (tp + fp), None) if tp + fp else (None, "no predicted positives")
    out["sensitivity"] = (tp / n_pos, None) if n_pos else (None, "only negative cases")
    out["specificity"] = (tn / n_neg, None) if n_neg else (None, "only positive cases")
    return out


def classification_metrics(
    probabilities: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    findings: Sequence[str] = CT_RATE_FINDINGS,
    threshold_method: str = "ct_clip",
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    macro_subsets: Mapping[str, Sequence[str]] | None = None,
) -> dict:
    """Per-finding and macro AUROC, F1, accuracy, precision, sensitivity, specificity with bootstrap CIs.

    Protocol: CT-CLIP (arXiv:2403.17834; ``scripts/bootstrap_values.py``) and fVLM (ICLR 2025, same
    code): AUROC from `sklearn.metrics.roc_auc_score`; one threshold per finding chosen on the whole
    evaluation set (`select_threshold`) and kept fixed in the bootstrap; ``"f1"`` is the
    support-weighted F1 of the two classes (``f1_score(average="weighted")`` as CT-CLIP),
    ``"f1_positive"`` the F1 of "present"; precision is that of "present". A finding whose threshold
    cannot be chosen (one class only; Youden's J never above 0) gets ``threshold: null`` with the reason,
    and its threshold-dependent metrics are computed at ``FALLBACK_THRESHOLD`` (0.5, rule ``p > 0.5``),
    named in the entry's ``fallback`` field.

    Two macro means per subset (``macro_subsets``; pass `CT_RATE_MACRO_SUBSETS` for CT-CLIP's 18 and
    fVLM's 16 findings):

    - ``"macro"``, the headline, computed as CT-CLIP's ``scripts/bootstrap_values.py`` computes it
      (github.com/ibrahimethemhamamci/CT-CLIP, HEAD a2a155c): the plain mean over every finding of the
      subset of scikit-learn's ``f1_score(average="weighted")``, ``accuracy_score`` and
      ``precision_score`` with their default ``zero_division``, so a finding with no predicted positives
      counts as precision 0 (likewise F1 of "present", sensitivity, specificity with an empty
      denominator); an AUROC undefined for any finding makes the AUROC mean undefined (CT-CLIP's is NaN),
      and a finding without labelled cases makes every mean undefined. Comparable with CT-CLIP's and
      fVLM's tables.
    - ``"macro_over_defined"``: the mean over the findings whose value is defined (undefined ones are
      listed with their reason and left out, not counted as 0).

    Labels may be NaN (unknown): each finding uses only its labelled cases. A value the data cannot
    define is ``null`` with the reason (no labels; only negative cases; no predicted positives); no
    number in the report is infinite or NaN.

    Bootstrap (CT-CLIP's script has its resampling commented out; this one resamples): ``n_bootstrap``
    resamples of the cases with replacement from `numpy.random.default_rng(seed)`; per resample every
    metric is recomputed at the fixed thresholds; a finding undefined in a resample (e.g. no positive
    drawn) is skipped there and counted. CIs are percentile intervals (``numpy.percentile``, linear
    interpolation) at ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` of the resamples where the
    value is defined; each macro resample follows its own rule above.

    Args:
        probabilities: ``(M, K)`` probabilities of "present" (`zero_shot_probabilities`).
        labels: ``(M, K)`` 0/1 labels, NaN where unknown.
        findings: the ``K`` column names.
        threshold_method: ``"ct_clip"``, ``"youden"`` or ``"fixed"`` (0.5).
        n_bootstrap: resamples; 0 disables the CIs.
        seed: bootstrap seed.
        confidence: CI level in (0, 1).
        macro_subsets: subset name -> findings to average; ``None`` averages all ``findings``.

    Returns:
        ``{"protocol": {...}, "per_class": {finding: {"n", "n_positive", "threshold", metric: entry}},
        "macro": {subset: {metric: entry}}, "macro_over_defined": {subset: {metric: entry}}}``; an entry
        is ``{"value", "reason"?}`` plus, with the bootstrap, ``"ci_low"``, ``"ci_high"``,
        ``"resamples_used"``, ``"resamples_skipped"``; a ``"macro"`` entry also lists
        ``"findings_counted_as_zero"`` (finding -> reason), a ``"macro_over_defined"`` entry
        ``"findings_used"``, ``"findings_undefined"`` (finding -> reason) and ``"class_resamples_skipped"``
        (finding-resample pairs left out of the macro resamples).

    Raises:
        ValueError: shapes differ from ``(M, K)``, labels other than 0/1/NaN, a subset naming an unknown
            finding, bad ``confidence`` or ``n_bootstrap``, unknown ``threshold_method``.
    """
    probs = np.asarray(torch.as_tensor(probabilities).detach().cpu().double().numpy())
    labs = np.asarray(torch.as_tensor(labels).detach().cpu().double().numpy())
    k = len(findings)
    if probs.ndim != 2 or probs.shape != labs.shape or probs.shape[1] != k:
        raise ValueError(f"probabilities {probs.shape} and labels {labs.shape} must both be (M, {k}) for {k} findings")
    known = labs[~np.isnan(labs)]
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0, 1 or NaN, got values {sorted(set(known.tolist()) - {0.0, 1.0})[:5]}")
    if not 0 < confidence < 1 or n_bootstrap < 0:
        raise ValueError(f"confidence must be in (0, 1) and n_bootstrap >= 0, got {confidence}, {n_bootstrap}")
    if threshold_method not in THRESHOLD_RULES:
        raise ValueError(f"threshold_method must be one of {tuple(THRESHOLD_RULES)}, got {threshold_method!r}")
    subsets = {name: tuple(members) for name, members in (macro_subsets or {"all": tuple(findings)}).items()}
    for name, members in subsets.items():
        unknown = set(members) - set(findings)
        if unknown:
            raise ValueError(f"macro subset {name!r} names findings not in the evaluation: {sorted(unknown)}")
    rule = THRESHOLD_RULES[threshold_method]
    fallback_rule = THRESHOLD_RULES["fixed"]
    thresholds = []
    for j in range(k):
        mask = ~np.isnan(labs[:, j])
        thresholds.append(select_threshold(probs[mask, j], labs[mask, j], threshold_method))
    # (threshold, rule) each finding is scored at: its own, or the stated fallback
    operating = [(t, rule) if t is not None else (FALLBACK_THRESHOLD, fallback_rule) for t, _ in thresholds]

    def per_class(rows: np.ndarray | slice) -> list[dict]:
        results = []
        for j in range(k):
            p, y = probs[rows, j], labs[rows, j]
            mask = ~np.isnan(y)
            results.append(_binary_metrics(p[mask], y[mask], *operating[j]))
        return results

    point = per_class(slice(None))
    labelled = ~np.isnan(labs)  # (M, K)

    n_metrics = len(CLASSIFICATION_METRICS)
    boot = np.full((n_bootstrap, k, n_metrics), np.nan)  # (N, K, metrics), NaN = undefined in that resample
    boot_labelled = np.zeros((n_bootstrap, k), dtype=bool)  # (N, K): the finding has a labelled case there
    rng = np.random.default_rng(seed)
    for b in range(n_bootstrap):
        rows = rng.integers(0, probs.shape[0], size=probs.shape[0])
        boot_labelled[b] = labelled[rows].any(0)
        for j, values in enumerate(per_class(rows)):
            boot[b, j] = [np.nan if values[name][0] is None else values[name][0] for name in CLASSIFICATION_METRICS]
    q = (100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2)

    def with_ci(entry: dict, samples: np.ndarray) -> dict:
        if n_bootstrap == 0 or entry["value"] is None:
            return entry
        valid = samples[~np.isnan(samples)]
        entry = dict(entry, resamples_used=int(valid.size), resamples_skipped=int(samples.size - valid.size))
        if valid.size == 0:
            return dict(entry, ci_low=None, ci_high=None, ci_reason="undefined in every resample")
        low, high = np.percentile(valid, q)
        return dict(entry, ci_low=float(low), ci_high=float(high))

    report: dict = {
        "protocol": {
            "threshold_method": threshold_method,
            "threshold_rule": f"present if probability {rule} threshold",
            "fallback_threshold": f"present if probability {fallback_rule} {FALLBACK_THRESHOLD} for a finding whose "
            "threshold cannot be chosen (its threshold entry is null with the reason)",
            "macro": "mean over every finding of the subset as CT-CLIP's code computes it (a value with an empty "
            "denominator, e.g. precision without predicted positives, counts as 0; an undefined AUROC leaves the "
            "AUROC mean undefined)",
            "macro_over_defined": "mean over the findings whose value is defined",
            "f1": "support-weighted over present/absent (CT-CLIP); f1_positive: present only",
            "n_bootstrap": n_bootstrap,
            "seed": seed,
            "confidence": confidence,
            "n_cases": int(probs.shape[0]),
        },
        "per_class": {},
        "macro": {},
        "macro_over_defined": {},
    }
    for j, finding in enumerate(findings):
        y = labs[:, j]
        threshold = {**_entry(*thresholds[j]), "rule": rule}
        if thresholds[j][0] is None:
            threshold.update(fallback=FALLBACK_THRESHOLD, fallback_rule=fallback_rule)
        row: dict = {"n": int(labelled[:, j].sum()), "n_positive": int((y == 1).sum()), "threshold": threshold}
        for m, name in enumerate(CLASSIFICATION_METRICS):
            row[name] = with_ci(_entry(*point[j][name]), boot[:, j, m])
        report["per_class"][finding] = row
    for subset, members in subsets.items():
        columns = [findings.index(f) for f in members]
        headline, over_defined = {}, {}
        for m, name in enumerate(CLASSIFICATION_METRICS):
            headline[name] = _ct_clip_macro(name, [findings[j] for j in columns], [point[j][name] for j in columns])
            if headline[name]["value"] is not None:  # each resample by the same rule
                values = boot[:, columns, m]  # (N, K_subset)
                ok = boot_labelled[:, columns].all(1) & (~np.isnan(values).any(1) if name == "auroc" else True)
                samples = np.where(ok, np.nan_to_num(values, nan=0.0).mean(1), np.nan)
                headline[name] = with_ci(headline[name], samples)
            used = [j for j in columns if point[j][name][0] is not None]
            undefined = {findings[j]: point[j][name][1] for j in columns if point[j][name][0] is None}
            if not used:
                entry = _entry(None, "undefined for every finding of the subset")
            else:
                entry = with_ci(
                    _entry(float(np.mean([point[j][name][0] for j in used]))), _nanmean_rows(boot[:, used, m])
                )
                if n_bootstrap:
                    entry["class_resamples_skipped"] = int(np.isnan(boot[:, used, m]).sum())
            over_defined[name] = dict(entry, findings_used=[findings[j] for j in used], findings_undefined=undefined)
        report["macro"][subset] = headline
        report["macro_over_defined"][subset] = over_defined
    return report


def _ct_clip_macro(name: str, findings: Sequence[str], values: Sequence[tuple[float | None, str | None]]) -> dict:
    """One metric's macro mean the way CT-CLIP's ``scripts/bootstrap_values.py`` gets it: scikit-learn's
    scores with their default ``zero_division`` (an empty denominator gives 0) averaged over every finding.

    ``values`` holds each finding's ``(value | None, reason | None)`` from `_binary_metrics`. An undefined
    AUROC (one class only) has no 0 convention: CT-CLIP's mean is then NaN, here ``null`` with the reason;
    so is every mean when a finding has no labelled case (CT-CLIP's labels are complete).
    """
    unlabelled = {f: reason for f, (value, reason) in zip(findings, values) if reason == "no labels"}
    if unlabelled:
        return dict(_entry(None, "findings without labelled cases: the mean over every finding is undefined"),
                    findings_undefined=unlabelled)  # fmt: skip
    undefined = {f: reason for f, (value, reason) in zip(findings, values) if value is None}
    if name == "auroc" and undefined:
        return dict(_entry(None, "AUROC undefined for some findings (CT-CLIP's mean is NaN)"),
                    findings_undefined=undefined)  # fmt: skip
    return dict(_entry(float(np.mean([value or 0.0 for value, _ in values]))), findings_counted_as_zero=undefined)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean of each row ``(N, K) -> (N,)`` over its non-NaN entries; NaN for an all-NaN row (no warning)."""
    count = (~np.isnan(values)).sum(1)
    total = np.nansum(values, axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def region_assignment_counts(
    logits: torch.Tensor, patch_to_region: torch.Tensor, background_fraction: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-assignment accuracy of the segmentation head, as counts to sum over an evaluation set.

    A patch is correct when the head's arg-max class equals the arg-max of its voxel fractions (class
    0 background, ``1..R`` regions; ties go to the lower class). Pure background patches
    (``background_fraction == 1``, mostly air and table) are not counted: they would dominate and
    inflate the accuracy. Accuracy = ``sum(correct) / sum(counted)``.

    Shapes:
        ``logits (B, N, R + 1)``, ``patch_to_region (B, N, R)``, ``background_fraction (B, N)`` ->
        ``(correct, counted)``, 0-dim int64.

    Raises:
        ValueError: as `SegmentationLoss`.
    """
    targets = segmentation_targets(patch_to_region, background_fraction)  # (B, N, R + 1)
    if logits.shape != targets.shape:
        raise ValueError(f"segmentation logits {tuple(logits.shape)} != targets (B, N, R + 1) {tuple(targets.shape)}")
    counted = background_fraction < 1  # (B, N)
    hits = (logits.argmax(-1) == targets.argmax(-1).to(logits.device)) & counted.to(logits.device)  # (B, N)
    return hits.sum(), counted.sum()


# ----------------------------------------------------------------------------------------------------
# region grounding
# ----------------------------------------------------------------------------------------------------


def finding_region_similarity(region_embedding: torch.Tensor, finding_embedding: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every region token to every finding prompt: ``(M, R, E), (K, E) -> (M, K, R)``.

    Token-wise image-text similarity as in FILIP (arXiv:2111.07783), at the level of anatomical region
    tokens. Pass ``ensemble_prompts(prompt_embedding)[:, 0]`` (the "present" prompts) as findings.

    Raises:
        ValueError: widths differ or the shapes are not ``(M, R, E)`` and ``(K, E)``.
    """
    if (
        region_embedding.ndim != 3
        or finding_embedding.ndim != 2
        or region_embedding.shape[-1] != finding_embedding.shape[-1]
    ):
        raise ValueError(
            f"region embeddings {tuple(region_embedding.shape)} (M, R, E) and findings {tuple(finding_embedding.shape)} "
            "(K, E) do not match"
        )
    regions = F.normalize(region_embedding.float(), dim=-1)
    findings = F.normalize(finding_embedding.float().to(regions.device), dim=-1)
    return torch.einsum("mre,ke->mkr", regions, findings)  # (M, K, R)


def top_regions_per_finding(
    similarity: torch.Tensor,
    region_present: torch.Tensor,
    findings: Sequence[str],
    region_names: Sequence[str],
    top_k: int = 3,
) -> dict:
    """Which region tokens score highest for each finding, over the evaluation set.

    For finding ``k`` and region ``r``: ``mean_similarity`` is the mean of ``similarity[m, k, r]`` over
    the cases where ``r`` is present, ``top1_fraction`` the fraction of cases (with any region present)
    whose most similar present region is ``r``. Regions are ranked by ``mean_similarity``.

    Args:
        similarity: ``(M, K, R)`` from `finding_region_similarity`.
        region_present: ``(M, R)`` bool (the encoder's ``region_present``).
        findings: ``K`` names; region_names: ``R`` names (`scripts.anatomy_regions.RegionMap.names`).
        top_k: regions listed per finding.

    Returns:
        ``{finding: [{"region", "mean_similarity", "top1_fraction"}, ...]}``, at most ``top_k`` each;
        a finding with no region present in any case maps to ``[]``.

    Raises:
        ValueError: shapes disagree with the name lists.
    """
    m, k, r = similarity.shape
    if region_present.shape != (m, r) or len(findings) != k or len(region_names) != r:
        raise ValueError(
            f"similarity {tuple(similarity.shape)}, region_present {tuple(region_present.shape)}, {len(findings)} findings "
            f"and {len(region_names)} regions disagree"
        )
    present = region_present.bool().to(similarity.device)[:, None, :].expand(m, k, r)  # (M, K, R)
    counts = present.sum(0).double()  # (K, R)
    summed = torch.where(present, similarity.double(), torch.zeros_like(similarity, dtype=torch.float64)).sum(
        0
    )  # (K, R)
    mean = summed / counts.clamp(min=1)
    masked = similarity.masked_fill(~present, -math.inf)
    has_any = present.any(-1)  # (M, K)
    winners = F.one_hot(masked.argmax(-1), r).double() * has_any[..., None]  # (M, K, R)
    top1 = winners.sum(0) / has_any.sum(0).clamp(min=1)[:, None].double()  # (K, R)
    out = {}
    for j, finding in enumerate(findings):
        ranked = [i for i in torch.argsort(mean[j], descending=True).tolist() if counts[j, i] > 0][:top_k]
        out[finding] = [
            {"region": region_names[i], "mean_similarity": float(mean[j, i]), "top1_fraction": float(top1[j, i])}
            for i in ranked
        ]
    return out


def region_auroc(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    region_names: Sequence[str],
    region_present: torch.Tensor | np.ndarray | None = None,
) -> dict:
    """Region-level AUROC of one finding: do the region tokens where it is labelled score higher?

    ``scores[m, r]`` is a region's score for the finding (e.g. ``finding_region_similarity(...)[:, k]``),
    ``labels[m, r]`` 1 where the finding lies in region ``r`` of case ``m``, 0 where it does not, NaN
    where unknown; absent regions (``region_present`` False) are left out. ``pooled`` ranks every
    labelled (case, region) pair together; ``per_region[r]`` ranks the cases for region ``r``. AUROC from
    `sklearn.metrics.roc_auc_score`; a set with one class only is ``null`` with the reason. The same
    function serves labels per region (any abnormality in the region).

    Args:
        scores: ``(M, R)``; labels: ``(M, R)`` 0/1/NaN; region_names: ``R`` names;
        region_present: ``(M, R)`` bool or ``None`` (all present).

    Returns:
        ``{"pooled": entry, "per_region": {name: entry}}`` with ``entry = {"value", "reason"?, "n", "n_positive"}``.

    Raises:
        ValueError: shapes differ or disagree with ``region_names``.
    """
    s = np.asarray(torch.as_tensor(scores).detach().cpu().double().numpy())
    y = np.asarray(torch.as_tensor(labels).detach().cpu().double().numpy())
    if s.shape != y.shape or s.ndim != 2 or s.shape[1] != len(region_names):
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be (M, R) with R = {len(region_names)} regions")
    keep = ~np.isnan(y)
    if region_present is not None:
        present = np.asarray(torch.as_tensor(region_present).detach().cpu().numpy()).astype(bool)
        if present.shape != s.shape:
            raise ValueError(f"region_present {present.shape} != scores {s.shape}")
        keep &= present

    def auroc(score: np.ndarray, label: np.ndarray) -> dict:
        reason = _single_class_reason(label)
        value = None if reason else float(roc_auc_score(label, score))
        return dict(_entry(value, reason), n=int(label.size), n_positive=int((label == 1).sum()))

    return {
        "pooled": auroc(s[keep], y[keep]),
        "per_region": {name: auroc(s[keep[:, r], r], y[keep[:, r], r]) for r, name in enumerate(region_names)},
    }


def text_patch_similarity(
    local_embedding: torch.Tensor, text_embedding: torch.Tensor, grid: Sequence[int]
) -> torch.Tensor:
    """Text-to-patch cosine similarity map ``(Z, Y, X)`` of one case (FILIP-style token similarity).

    Args:
        local_embedding: ``(N, E)`` patch embeddings (the encoder's ``local_embedding`` of one case),
            in the encoder's row-major ``(z, y, x)`` order with ``x`` fastest
            (`scripts.networks.patch_embedding.patch_grid_positions`).
        text_embedding: ``(E,)`` text embedding (a finding prompt or a report sentence).
        grid: ``(Z, Y, X)`` patch grid, ``Z`` the slice axis (superior at high ``z`` after RAS orientation).

    Returns:
        ``(Z, Y, X)`` float32 similarities in ``[-1, 1]``; `scripts.visualize.save_patch_map_nifti` puts
        it on the CT grid.

    Raises:
        ValueError: ``N != Z * Y * X`` or widths differ.
    """
    z, y, x = (int(g) for g in grid)
    if (
        local_embedding.ndim != 2
        or local_embedding.shape[0] != z * y * x
        or text_embedding.shape != local_embedding.shape[1:]
    ):
        raise ValueError(
            f"local embeddings {tuple(local_embedding.shape)} and text {tuple(text_embedding.shape)} do not fit grid {(z, y, x)}"
        )
    sim = F.normalize(local_embedding.float(), dim=-1) @ F.normalize(text_embedding.float(), dim=-1)  # (N,)
    return sim.reshape(z, y, x)  # (N,) -> (Z, Y, X)


# ----------------------------------------------------------------------------------------------------
# chain-of-thought alignment
# ----------------------------------------------------------------------------------------------------


def region_slice_centroids(patch_to_region: torch.Tensor, patch_positions: torch.Tensor) -> torch.Tensor:
    """Cranio-caudal position of each region: ``(B, N, R), (B, N, 3) -> (B, R)``.

    The mean slice index ``z`` of the patches, weighted by their fraction in the region, in patch rows
    (``z`` grows towards superior after RAS orientation); NaN for a region absent from the case.
    """
    weight = patch_to_region.double()  # (B, N, R)
    z = patch_positions[..., 0].double()  # (B, N)
    total = weight.sum(1)  # (B, R)
    centroid = torch.einsum("bnr,bn->br", weight, z) / total.clamp(min=1e-12)
    return torch.where(total > 0, centroid, torch.full_like(centroid, math.nan))


def cot_alignment(
    step_embedding: torch.Tensor,
    step_case_index: torch.Tensor,
    step_tags: torch.Tensor,
    case_index: torch.Tensor,
    region_embedding: torch.Tensor,
    region_present: torch.Tensor,
    region_z: torch.Tensor,
) -> dict:
    """Chain-of-thought grounding: step-to-region accuracy and step order consistency.

    Each reasoning step ``s`` of case ``m`` has an embedding ``e_s`` and a set of tagged regions
    ``T_s``. With ``P_m`` the regions present in case ``m`` and ``g_{m,r}`` its region tokens, the
    step's grounded region is ``p_s = argmax_{r in P_m} cos(e_s, g_{m,r})``. Steps with
    ``T_s ∩ P_m = ∅`` are not scored.

    Step-to-region accuracy (pooled over scored steps ``S'``)::

        acc = 1/|S'| * sum_s [p_s in T_s ∩ P_m],   chance = 1/|S'| * sum_s |T_s ∩ P_m| / |P_m|

    Step order consistency: does the grounding put the steps in the same cranio-caudal order as the
    tags? With ``z(r)`` the region's slice centroid in the case (`region_slice_centroids`), the tagged
    position ``t_s = mean_{r in T_s ∩ P_m} z(r)`` and the grounded position ``u_s = z(p_s)``, over the
    pairs of scored steps of one chain with ``t_i != t_j`` (pooled over chains)::

        C = (#{sign(u_j - u_i) = sign(t_j - t_i)} + 1/2 #{u_i = u_j}) / #pairs

    the concordance index of Harrell et al. (JAMA 1982) between grounded and tagged positions: 1 = the
    chain is grounded in the tagged anatomical order, 0.5 = chance, 0 = reversed. Anatomy, not the
    text's step index, is the reference because the order in which a report visits organs is a writing
    habit, while the tagged regions' positions are measured in the case's own label map; the measure
    gives partial credit to a step grounded in a neighbouring region on the right side of its
    neighbours.

    Args:
        step_embedding: ``(S, E)`` step embeddings of all chains.
        step_case_index: ``(S,)`` case index of each step (values of ``case_index``).
        step_tags: ``(S, R)`` bool, the step's tagged regions.
        case_index: ``(M,)`` case index of each row of the region tensors (e.g. from `gather_cases`).
        region_embedding: ``(M, R, E)`` region tokens; region_present: ``(M, R)`` bool;
        region_z: ``(M, R)`` slice centroids (NaN where absent).

    Returns:
        ``{"step_region_accuracy": entry + {"n_steps", "chance"}, "step_order_consistency": entry +
        {"n_pairs"}}``; ``null`` with a reason when no step (or no comparable pair) can be scored.

    Raises:
        ValueError: shapes disagree, or a step names a case missing from ``case_index``.
    """
    s, m, r = step_embedding.shape[0], case_index.shape[0], region_embedding.shape[1]
    if (
        step_case_index.shape != (s,)
        or step_tags.shape != (s, r)
        or region_present.shape != (m, r)
        or region_z.shape != (m, r)
    ):
        raise ValueError(
            f"steps {tuple(step_embedding.shape)}, step cases {tuple(step_case_index.shape)}, tags {tuple(step_tags.shape)}, "
            f"regions {tuple(region_embedding.shape)}, present {tuple(region_present.shape)}, z {tuple(region_z.shape)} disagree"
        )
    step_cases = step_case_index.cpu()
    cases, order = case_index.cpu().sort()
    pos = torch.searchsorted(cases, step_cases).clamp(max=max(m - 1, 0))
    if m == 0 or not torch.equal(cases[pos], step_cases):
        raise ValueError("cot_alignment: some steps belong to cases missing from case_index")
    rows = order[pos]  # (S,) row of each step's case
    present = region_present.cpu().bool()[rows]  # (S, R)
    steps = F.normalize(step_embedding.float().cpu(), dim=-1)  # (S, E)
    tokens = F.normalize(region_embedding.float().cpu()[rows], dim=-1)  # (S, R, E): the regions of each step's case
    sim = torch.einsum("se,sre->sr", steps, tokens)  # (S, R)
    predicted = sim.masked_fill(~present, -math.inf).argmax(1)  # (S,)
    tags = step_tags.cpu().bool() & present  # (S, R)
    scored = tags.any(1)
    n_scored = int(scored.sum())
    if n_scored == 0:
        accuracy = dict(_entry(None, "no step has a tagged region present in its case"), n_steps=0)
    else:
        hit = tags[torch.arange(s), predicted][scored].double()
        chance = (tags.sum(1).double() / present.sum(1).clamp(min=1).double())[scored]
        accuracy = dict(_entry(hit.mean().item()), n_steps=n_scored, chance=chance.mean().item())
    z = region_z.cpu().double()[rows]  # (S, R)
    tagged_z = torch.where(tags, z, torch.zeros_like(z)).sum(1) / tags.sum(1).clamp(min=1)  # (S,)
    grounded_z = z[torch.arange(s), predicted]  # (S,)
    concordant, pairs = 0.0, 0
    for case in step_cases[scored].unique():
        members = torch.nonzero(scored & (step_cases == case)).flatten()  # scored steps of one chain
        t, u = tagged_z[members], grounded_z[members]
        i, j = torch.triu_indices(len(members), len(members), offset=1)
        comparable = t[i] != t[j]
        agree = torch.sign(u[j] - u[i]) == torch.sign(t[j] - t[i])
        ties = u[j] == u[i]
        concordant += float((agree & comparable & ~ties).sum()) + 0.5 * float((ties & comparable).sum())
        pairs += int(comparable.sum())
    if pairs == 0:
        order_entry = dict(_entry(None, "no pair of scored steps with distinct tagged positions"), n_pairs=0)
    else:
        order_entry = dict(_entry(concordant / pairs), n_pairs=pairs)
    return {"step_region_accuracy": accuracy, "step_order_consistency": order_entry}


# ----------------------------------------------------------------------------------------------------
# Ignite metrics for the evaluator
# ----------------------------------------------------------------------------------------------------


class RetrievalEvaluation(Metric):
    """The full retrieval report (`retrieval_metrics`) of one evaluation pass, correct under DDP.

    Each iteration's output (after ``output_transform``) is ``(case_index (B,), image_embedding (B, E),
    text_embedding (B, E), keys (B, 2))``: the dataset index of each case and the study/report keys of
    `scripts.losses.pair_keys`. At the end the rows of all ranks are gathered once per case
    (`CaseAccumulator`), optionally reduced to one volume per study (`select_one_per_study` with case
    index as case id), grouped (`scripts.losses.positive_groups`) and ranked. `compute` returns the
    report dict; it is stored whole under the metric's name (``metrics_result_mode="named"``).

    Args:
        ks, tie_mode, pool_size, seed: as in `retrieval_metrics`.
        one_per_study: keep one volume per study (CT-CLIP's "one volume per scan" pool).
        output_transform: maps the engine output to the quadruple above.
        device: where rows are stored and gathered.
    """

    def __init__(
        self,
        ks: Sequence[int] = RETRIEVAL_KS,
        tie_mode: str = "mean",
        one_per_study: bool = True,
        pool_size: int | None = None,
        seed: int = 0,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        if tie_mode not in TIE_MODES or not ks:
            raise ValueError(f"tie_mode must be one of {TIE_MODES} and ks non-empty, got {tie_mode!r}, {ks}")
        self.ks, self.tie_mode, self.pool_size, self.seed = tuple(ks), tie_mode, pool_size, seed
        self.one_per_study = one_per_study
        self._rows = CaseAccumulator(device)
        super().__init__(output_transform=output_transform, device=device, metrics_result_mode="named")

    def reset(self) -> None:
        self._rows.reset()

    def update(self, output: Sequence[torch.Tensor]) -> None:
        case_index, image, text, keys = output
        self._rows.update(case_index, {"image": image.float(), "text": text.float(), "keys": keys.long()})

    def compute(self) -> dict:
        case_index, rows = self._rows.gather()
        report, _, _ = study_retrieval(
            case_index.cpu(), rows["image"].cpu(), rows["text"].cpu(), rows["keys"].cpu(), self.ks, self.tie_mode,
            self.one_per_study, self.pool_size, self.seed,
        )  # fmt: skip
        return report


class ZeroShotEvaluation(Metric):
    """The zero-shot classification report (`classification_metrics`) of one pass, correct under DDP.

    Each iteration's output is ``(case_index (B,), image_embedding (B, E), labels (B, K))`` with labels
    0/1/NaN in the order of ``findings``. The prompt embeddings are computed once by the caller
    (`prompt_embeddings` with the text tower) and given here with the model's ``logit_scale``. `compute`
    gathers the cases of all ranks once each, computes `zero_shot_probabilities` and returns the report
    dict, stored whole under the metric's name.

    Args:
        prompt_embedding: ``(K, 2, T, E)``.
        logit_scale: the model's logit scale.
        findings: the ``K`` finding names, matching the label columns.
        threshold_method, n_bootstrap, seed, confidence, macro_subsets: as in `classification_metrics`
            (default subsets: CT-CLIP's 18 and fVLM's 16 findings).
        output_transform: maps the engine output to the triple above.
        device: where rows are stored and gathered.

    Raises:
        ValueError: ``prompt_embedding`` does not hold one row per finding.
    """

    def __init__(
        self,
        prompt_embedding: torch.Tensor,
        logit_scale: float,
        findings: Sequence[str] = CT_RATE_FINDINGS,
        threshold_method: str = "ct_clip",
        n_bootstrap: int = 1000,
        seed: int = 0,
        confidence: float = 0.95,
        macro_subsets: Mapping[str, Sequence[str]] | None = CT_RATE_MACRO_SUBSETS,
        output_transform: Callable = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        if prompt_embedding.ndim != 4 or prompt_embedding.shape[0] != len(findings):
            raise ValueError(
                f"prompt embeddings {tuple(prompt_embedding.shape)} must be (K, 2, T, E) with K = {len(findings)}"
            )
        self.prompt_embedding = prompt_embedding.detach()
        self.logit_scale = float(logit_scale)
        self.findings = tuple(findings)
        self.threshold_method, self.n_bootstrap, self.seed, self.confidence = (
            threshold_method,
            n_bootstrap,
            seed,
            confidence,
        )
        self.macro_subsets = macro_subsets
        self._rows = CaseAccumulator(device)
        super().__init__(output_transform=output_transform, device=device, metrics_result_mode="named")

    def reset(self) -> None:
        self._rows.reset()

    def update(self, output: Sequence[torch.Tensor]) -> None:
        case_index, image, labels = output
        self._rows.update(case_index, {"image": image.float(), "labels": torch.as_tensor(labels).double()})

    def compute(self) -> dict:
        _, rows = self._rows.gather()
        probabilities = zero_shot_probabilities(rows["image"].cpu(), self.prompt_embedding.cpu(), self.logit_scale)
        return classification_metrics(
            probabilities,
            rows["labels"].cpu(),
            self.findings,
            self.threshold_method,
            self.n_bootstrap,
            self.seed,
            self.confidence,
            self.macro_subsets,
        )
