"""Evaluation metrics against hand-computed values, scikit-learn, brute force, and a 2-process DDP run."""

from __future__ import annotations

import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import close_gloo, init_gloo, start_gloo_processes
from scripts.losses import pair_keys, positive_groups
from scripts.metrics import (
    CT_CLIP_TEMPLATES,
    CT_RATE_FINDINGS,
    CT_RATE_MACRO_SUBSETS,
    FVLM_FINDINGS,
    CaseAccumulator,
    RetrievalEvaluation,
    RetrievalRecall,
    ZeroShotEvaluation,
    _comb_ratio,
    _hits,
    _tie_counts,
    chance_recall_at_k,
    classification_metrics,
    cot_alignment,
    finding_region_similarity,
    gather_cases,
    prompt_embeddings,
    prompt_texts,
    recall_at_k,
    region_auroc,
    region_slice_centroids,
    retrieval_metrics,
    retrieval_ranks,
    select_one_per_study,
    select_threshold,
    text_patch_similarity,
    top_regions_per_finding,
    zero_shot_probabilities,
)
from scripts.networks.patch_embedding import patch_grid_positions
from sklearn.metrics import accuracy_score, f1_score, precision_score, roc_auc_score


def _value(report: dict, direction: str, name: str):
    return report[direction][name]["value"]


# ---------------------------------------------------------------- retrieval


def test_existing_recall_helpers_by_hand():
    relevant = torch.eye(4, dtype=torch.bool)
    similarity = torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    # query 0 hits at rank 1; query 1 at rank 3; query 2 at rank 2; query 3 at rank 1
    assert recall_at_k(similarity, relevant, 1) == 0.5
    assert recall_at_k(similarity, relevant, 3) == 1.0
    assert chance_recall_at_k(relevant, 1) == pytest.approx(0.25)
    assert chance_recall_at_k(relevant, 2) == pytest.approx(0.5)


def test_perfect_ranking_gives_recall_one_and_rank_one():
    emb = torch.eye(6)
    groups = torch.arange(6)
    for tie_mode in ("mean", "pessimistic", "optimistic"):
        report = retrieval_metrics(emb, emb, groups, ks=(1, 5), tie_mode=tie_mode)
        for direction in ("image_to_text", "text_to_image"):
            assert _value(report, direction, "recall@1") == 1.0
            assert _value(report, direction, "mean_rank") == 1.0
            assert _value(report, direction, "median_rank") == 1.0
            assert report[direction]["chance"]["recall@1"]["value"] == pytest.approx(1 / 6)
            assert report[direction]["chance"]["mean_rank"]["value"] == pytest.approx(7 / 2)


def test_reversed_ranking_known_values():
    # every image is the opposite of its report: its pair scores -1, every other report 0 -> rank M
    text = torch.eye(5)
    report = retrieval_metrics(-text, text, torch.arange(5), ks=(1, 4))
    assert _value(report, "image_to_text", "recall@1") == 0.0
    assert _value(report, "image_to_text", "recall@4") == 0.0
    assert _value(report, "text_to_image", "mean_rank") == 5.0
    # distinct scores, candidate j always scores j: query i's pair is ranked M - i
    sim = torch.arange(4.0).repeat(4, 1)
    ranks = retrieval_ranks(sim, torch.eye(4, dtype=torch.bool))
    assert ranks.tolist() == [4.0, 3.0, 2.0, 1.0]
    assert float(ranks.mean()) == 2.5 and float(np.median(ranks.numpy())) == 2.5


def test_tie_modes_on_a_collapsed_model_by_hand():
    same = torch.ones(4, 3)  # every embedding identical: one block of ties
    groups = torch.tensor([0, 0, 1, 2])  # items 0 and 1 share a study
    mean = retrieval_metrics(same, same, groups, ks=(1, 2), tie_mode="mean")
    # queries 0, 1: r = 2 relevant, t = 2 irrelevant tied: P(hit@1) = 1/2, rank 1 + 2/3
    # queries 2, 3: r = 1, t = 3: P(hit@1) = 1/4, rank 1 + 3/2
    assert _value(mean, "image_to_text", "recall@1") == pytest.approx((0.5 + 0.5 + 0.25 + 0.25) / 4)
    assert _value(mean, "image_to_text", "mean_rank") == pytest.approx((2 * 5 / 3 + 2 * 2.5) / 4)
    # the expected value of random tie-breaking equals the chance level
    assert _value(mean, "image_to_text", "recall@1") == pytest.approx(
        mean["image_to_text"]["chance"]["recall@1"]["value"]
    )
    pessimistic = retrieval_metrics(same, same, groups, ks=(1, 2), tie_mode="pessimistic")
    optimistic = retrieval_metrics(same, same, groups, ks=(1, 2), tie_mode="optimistic")
    assert _value(pessimistic, "text_to_image", "recall@1") == 0.0
    assert _value(pessimistic, "text_to_image", "mean_rank") == pytest.approx((3 + 3 + 4 + 4) / 4)
    assert _value(optimistic, "text_to_image", "recall@1") == 1.0


def test_mean_tie_mode_equals_brute_force_over_tie_orders():
    g = torch.Generator().manual_seed(3)
    sim = torch.randint(0, 3, (6, 6), generator=g).double()  # many ties
    relevant = torch.eye(6, dtype=torch.bool) | (torch.rand(6, 6, generator=g) < 0.15)
    counts = _tie_counts(sim, relevant)
    expected_rank, expected_hit2 = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    perms = list(itertools.permutations(range(6)))
    for perm in perms:  # break ties by a random candidate order, then average over all orders
        order = sorted(range(6), key=lambda c: perm[c])
        for q in range(6):
            ranked = sorted(order, key=lambda c: -sim[q, c].item())  # stable: ties keep the permuted order
            first = 1 + next(i for i, c in enumerate(ranked) if relevant[q, c])
            expected_rank[q] += first / len(perms)
            expected_hit2[q] += (first <= 2) / len(perms)
    assert torch.allclose(retrieval_ranks(sim, relevant, "mean"), expected_rank)
    assert torch.allclose(_hits(counts, 2, "mean"), expected_hit2)


def test_optimistic_recall_matches_topk_without_ties():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    report = retrieval_metrics(image, text, torch.arange(40), ks=(1, 5, 10), tie_mode="optimistic")
    sim = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    eye = torch.eye(40, dtype=torch.bool)
    for k in (1, 5, 10):
        assert _value(report, "image_to_text", f"recall@{k}") == pytest.approx(recall_at_k(sim, eye, k))
        assert _value(report, "text_to_image", f"recall@{k}") == pytest.approx(recall_at_k(sim.T, eye, k))
        assert report["image_to_text"]["chance"][f"recall@{k}"]["value"] == pytest.approx(chance_recall_at_k(eye, k))
    curve = report["image_to_text"]["recall_curve"]
    assert curve["k"] == list(range(1, 11)) and curve["recall"][4] == pytest.approx(recall_at_k(sim, eye, 5))


def test_duplicate_reports_are_one_study():
    # studies a and b have one identical report; image b lies nearest to it, image a a little further
    keys = pair_keys(["a", "b", "c"], ["same report", "same report", "other"])
    groups = positive_groups(keys)
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    image = torch.tensor([[0.9, 0.1], [1.0, 0.0], [0.0, 1.0]])
    report = retrieval_metrics(image, text, groups, ks=(1,), tie_mode="pessimistic")
    assert _value(report, "image_to_text", "recall@1") == 1.0
    assert _value(report, "text_to_image", "recall@1") == 1.0
    diagonal_only = retrieval_metrics(image, text, torch.arange(3), ks=(1,), tie_mode="pessimistic")
    assert _value(diagonal_only, "image_to_text", "recall@1") < 1.0


def test_recall_at_k_beyond_the_pool_is_null_with_reason():
    report = retrieval_metrics(torch.eye(5), torch.eye(5), torch.arange(5), ks=(1, 5, 100))
    entry = report["image_to_text"]["recall@100"]
    assert entry["value"] is None and "5 candidates" in entry["reason"]
    assert report["image_to_text"]["recall@5"]["value"] is None
    json.dumps(report, allow_nan=False)


def test_fixed_size_pools():
    same = torch.ones(10, 4)
    report = retrieval_metrics(same, same, torch.arange(10), ks=(1,), pool_size=4, seed=1)
    assert report["protocol"]["pools"] == 2 and report["protocol"]["pairs_left_out"] == 2
    assert _value(report, "image_to_text", "recall@1") == pytest.approx(1 / 4)  # chance in a pool of 4, not 10
    whole = retrieval_metrics(same, same, torch.arange(10), ks=(1,))
    assert _value(whole, "image_to_text", "recall@1") == pytest.approx(1 / 10)
    with pytest.raises(ValueError, match="pool_size"):
        retrieval_metrics(same, same, torch.arange(10), pool_size=11)


def test_select_one_per_study_is_deterministic():
    cases = ["valid_2_a_2", "valid_1_a_1", "valid_2_a_1", "valid_1_b_1", "valid_1_a_2"]
    studies = [c.rsplit("_", 1)[0] for c in cases]
    chosen = select_one_per_study(studies, cases)
    assert [cases[i] for i in chosen] == ["valid_1_a_1", "valid_1_b_1", "valid_2_a_1"]
    order = [4, 2, 0, 3, 1]  # another delivery order (other ranks, other batches) picks the same volumes
    again = select_one_per_study([studies[i] for i in order], [cases[i] for i in order])
    assert [cases[order[i]] for i in again] == ["valid_1_a_1", "valid_1_b_1", "valid_2_a_1"]


def test_comb_ratio_matches_exact_binomials():
    for a, b, k in [(3, 5, 2), (0, 4, 1), (10, 12, 3), (2, 6, 3), (1500, 1564, 100)]:
        expected = math.comb(a, k) / math.comb(b, k)
        assert _comb_ratio(torch.tensor([a]), torch.tensor([b]), k).item() == pytest.approx(
            expected, rel=1e-9, abs=1e-300
        )


# ---------------------------------------------------------------- zero-shot classification


def test_finding_names_and_fvlm_subset():
    assert len(CT_RATE_FINDINGS) == 18 and len(set(CT_RATE_FINDINGS)) == 18
    assert CT_RATE_FINDINGS[0] == "Medical material" and CT_RATE_FINDINGS[-1] == "Interlobular septal thickening"
    assert len(FVLM_FINDINGS) == 16 and {"Medical material", "Lymphadenopathy"}.isdisjoint(FVLM_FINDINGS)
    assert prompt_texts(["Emphysema"], CT_CLIP_TEMPLATES) == ["Emphysema is present.", "Emphysema is not present."]


def test_prompt_embeddings_layout():
    templates = (("{finding} yes.", "{finding} no."), ("there is {finding}.", "there is no {finding}."))
    texts = prompt_texts(["A", "B"], templates)
    index = {t: i for i, t in enumerate(texts)}

    def encode(batch):
        return torch.tensor([[float(index[t]), 1.0] for t in batch])

    emb = prompt_embeddings(encode, ["A", "B"], templates)  # (K, 2, T, E)
    assert emb.shape == (2, 2, 2, 2)
    assert texts[int(emb[1, 1, 0, 0])] == "B no."
    assert texts[int(emb[0, 0, 1, 0])] == "there is A."


def test_zero_shot_probability_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    prompts = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (K=1, 2, T=1, E=2): present = x, absent = y
    probs = zero_shot_probabilities(image, prompts, logit_scale=2.0)
    assert probs[0, 0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 1))
    assert probs[1, 0].item() == pytest.approx(1 / (1 + math.exp(2)))
    # two templates are averaged as unit vectors: present (1, 0) and (0.6, 0.8) -> (0.8, 0.4) / |.|
    two = torch.tensor([[[[1.0, 0.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 2.0]]]])  # (1, 2, 2, 2)
    present = torch.tensor([0.8, 0.4]) / math.hypot(0.8, 0.4)
    expected = 1 / (1 + math.exp(-5.0 * (present[0].item() - 0.0)))
    assert zero_shot_probabilities(image[:1], two, logit_scale=5.0)[0, 0].item() == pytest.approx(expected)


def test_ct_clip_and_youden_thresholds_by_hand():
    p = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0.0, 0.0, 1.0, 1.0])
    # distance to (0, 1) is 0.5 for t in [0.1, 0.35) and in [0.4, 0.8): CT-CLIP keeps the last grid point
    threshold, reason = select_threshold(p, y, "ct_clip")
    assert reason is None and threshold == pytest.approx(79 / 99)
    # Youden's J = 0.5 at 0.8 and at 0.35: the highest threshold wins
    assert select_threshold(p, y, "youden") == (pytest.approx(0.8), None)
    assert select_threshold(p, y, "fixed") == (0.5, None)
    assert select_threshold(p, np.zeros(4), "ct_clip") == (None, "only negative cases")


def test_ct_clip_threshold_matches_a_plain_loop():
    rng = np.random.default_rng(5)
    y = (rng.random(50) < 0.3).astype(float)
    p = np.clip(0.3 * y + rng.random(50) * 0.7, 0, 1)
    best, best_distance = None, math.inf
    for t in np.linspace(0, 1, 100):  # the rule as CT-CLIP's README describes it, written out
        pred = p > t
        tpr = (pred & (y == 1)).sum() / (y == 1).sum()
        fpr = (pred & (y == 0)).sum() / (y == 0).sum()
        distance = math.sqrt((1 - tpr) ** 2 + fpr**2)
        if distance <= best_distance:
            best, best_distance = t, distance
    assert select_threshold(p, y, "ct_clip")[0] == best


@pytest.mark.parametrize("method", ["ct_clip", "youden", "fixed"])
def test_classification_metrics_match_sklearn(method):
    rng = np.random.default_rng(1)
    labels = (rng.random((60, 3)) < 0.4).astype(float)
    probs = np.clip(0.35 * labels + 0.65 * rng.random((60, 3)), 0, 1)
    labels[rng.random((60, 3)) < 0.1] = np.nan  # unknown labels
    report = classification_metrics(probs, labels, ["a", "b", "c"], threshold_method=method, n_bootstrap=0)
    aurocs = []
    for j, name in enumerate("abc"):
        mask = ~np.isnan(labels[:, j])
        y, p = labels[mask, j], probs[mask, j]
        row = report["per_class"][name]
        threshold = row["threshold"]["value"]
        pred = (p >= threshold) if method == "youden" else (p > threshold)
        assert row["n"] == mask.sum()
        assert row["auroc"]["value"] == pytest.approx(roc_auc_score(y, p))
        assert row["f1"]["value"] == pytest.approx(f1_score(y, pred, average="weighted"))
        assert row["f1_positive"]["value"] == pytest.approx(f1_score(y, pred))
        assert row["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
        assert row["precision"]["value"] == pytest.approx(precision_score(y, pred))
        aurocs.append(roc_auc_score(y, p))
    assert report["macro"]["all"]["auroc"]["value"] == pytest.approx(np.mean(aurocs))


def test_undefined_metrics_are_null_with_reason():
    rng = np.random.default_rng(2)
    probs = rng.random((20, 3))
    labels = np.stack([rng.random(20) < 0.5, np.zeros(20), np.full(20, np.nan)], 1).astype(float)
    labels[0, 0], labels[1, 0] = 0.0, 1.0
    report = classification_metrics(probs, labels, ["ok", "negatives", "unknown"], n_bootstrap=20)
    negatives, unknown = report["per_class"]["negatives"], report["per_class"]["unknown"]
    assert negatives["auroc"] == {"value": None, "reason": "only negative cases"}
    # no threshold can be chosen on one class: null with the reason, metrics at the stated fallback 0.5
    assert negatives["threshold"] == {"value": None, "reason": "only negative cases", "rule": ">", "fallback": 0.5,
                                      "fallback_rule": ">"}  # fmt: skip
    assert negatives["accuracy"]["value"] == pytest.approx(np.mean(probs[:, 1] <= 0.5))
    assert negatives["sensitivity"] == {"value": None, "reason": "only negative cases"}
    assert unknown["auroc"] == {"value": None, "reason": "no labels"} and unknown["n"] == 0
    macro = report["macro_over_defined"]["all"]["auroc"]
    assert macro["findings_used"] == ["ok"] and macro["value"] == pytest.approx(
        report["per_class"]["ok"]["auroc"]["value"]
    )
    assert macro["findings_undefined"] == {"negatives": "only negative cases", "unknown": "no labels"}
    # the headline (CT-CLIP's mean over every finding) is undefined with a finding that has no labels
    assert report["macro"]["all"]["auroc"]["value"] is None
    assert report["macro"]["all"]["precision"]["findings_undefined"] == {"unknown": "no labels"}
    json.dumps(report, allow_nan=False)  # no NaN anywhere: JSON-serialisable as is


def test_bootstrap_resamples_contains_point_and_follows_the_seed():
    rng = np.random.default_rng(3)
    labels = (rng.random((80, 2)) < 0.4).astype(float)
    probs = np.clip(0.3 * labels + 0.7 * rng.random((80, 2)), 0, 1)
    a = classification_metrics(probs, labels, ["x", "y"], n_bootstrap=100, seed=0)
    b = classification_metrics(probs, labels, ["x", "y"], n_bootstrap=100, seed=1)
    again = classification_metrics(probs, labels, ["x", "y"], n_bootstrap=100, seed=0)
    for entry in (a["per_class"]["x"]["auroc"], a["per_class"]["y"]["f1"], a["macro"]["all"]["auroc"]):
        assert entry["ci_low"] < entry["value"] < entry["ci_high"]
        assert entry["resamples_used"] == 100 and entry["resamples_skipped"] == 0
    assert a["per_class"]["x"]["auroc"]["ci_low"] != b["per_class"]["x"]["auroc"]["ci_low"]
    assert a == again
    wider = classification_metrics(probs, labels, ["x", "y"], n_bootstrap=100, seed=0, confidence=0.99)
    assert wider["per_class"]["x"]["auroc"]["ci_low"] < a["per_class"]["x"]["auroc"]["ci_low"]


def test_bootstrap_skips_and_counts_resamples_without_a_positive():
    rng = np.random.default_rng(4)
    labels = np.zeros((30, 1))
    labels[7] = 1.0  # one positive: about (29/30)^30 = 36% of resamples draw none
    report = classification_metrics(rng.random((30, 1)), labels, ["rare"], n_bootstrap=200, seed=0)
    auroc = report["per_class"]["rare"]["auroc"]
    assert auroc["resamples_used"] + auroc["resamples_skipped"] == 200
    assert 40 < auroc["resamples_skipped"] < 110
    assert report["macro_over_defined"]["all"]["auroc"]["class_resamples_skipped"] == auroc["resamples_skipped"]
    # the headline AUROC mean is undefined in the resamples without a positive: skipped, the same count
    assert report["macro"]["all"]["auroc"]["resamples_skipped"] == auroc["resamples_skipped"]


def test_youden_without_a_separating_threshold_is_null_with_the_fallback_and_the_report_is_finite():
    # every absent case scores above every present one: TPR > FPR nowhere, roc_curve's best is its +inf sentinel
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    y = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
    threshold, reason = select_threshold(p, y, "youden")
    assert threshold is None and "Youden's J <= 0" in reason
    labels = np.stack([y, np.array([0.0, 1.0, 0.0, 1.0, 1.0])], 1)
    probs = np.stack([p, np.array([0.1, 0.9, 0.2, 0.8, 0.6])], 1)
    report = classification_metrics(probs, labels, ["inverted", "ok"], threshold_method="youden", n_bootstrap=30)
    row = report["per_class"]["inverted"]
    assert row["threshold"]["value"] is None and row["threshold"]["fallback"] == 0.5
    pred = p > 0.5  # scored at the fallback, rule p > 0.5: three false positives, no true positive
    assert row["precision"]["value"] == 0.0 and row["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert report["per_class"]["ok"]["threshold"]["value"] == pytest.approx(0.6)
    text = json.dumps(report, allow_nan=False)  # the report that used to raise ValueError
    assert "Infinity" not in text and "NaN" not in text


def test_headline_macro_counts_no_predicted_positives_as_zero_like_ct_clip():
    """CT-CLIP's scripts/bootstrap_values.py (HEAD a2a155c) averages sklearn's precision_score, f1_score
    (weighted) and accuracy_score over the findings; precision_score gives 0 without predicted positives."""
    rng = np.random.default_rng(7)
    labels = (rng.random((40, 3)) < 0.5).astype(float)
    probs = np.clip(0.3 * labels + 0.6 * rng.random((40, 3)), 0, 1)
    probs[:, 2] = 0.01  # never predicted present at any threshold on the grid
    report = classification_metrics(probs, labels, ["a", "b", "never"], threshold_method="fixed", n_bootstrap=0)
    expected = {"precision": [], "f1": [], "accuracy": []}
    for j in range(3):
        pred = probs[:, j] > 0.5
        expected["precision"].append(precision_score(labels[:, j], pred, zero_division=0))
        expected["f1"].append(f1_score(labels[:, j], pred, average="weighted", zero_division=0))
        expected["accuracy"].append(accuracy_score(labels[:, j], pred))
    for name, values in expected.items():
        assert report["macro"]["all"][name]["value"] == pytest.approx(np.mean(values))
    assert report["per_class"]["never"]["precision"] == {"value": None, "reason": "no predicted positives"}
    assert report["macro"]["all"]["precision"]["findings_counted_as_zero"] == {"never": "no predicted positives"}
    # our null-aware mean leaves the undefined finding out instead, under its own name
    over_defined = report["macro_over_defined"]["all"]["precision"]
    assert over_defined["value"] == pytest.approx(np.mean(expected["precision"][:2]))
    assert over_defined["value"] > report["macro"]["all"]["precision"]["value"]


def test_fvlm_macro_is_the_mean_of_its_sixteen_findings():
    rng = np.random.default_rng(6)
    labels = (rng.random((40, 18)) < 0.5).astype(float)
    probs = rng.random((40, 18))
    report = classification_metrics(probs, labels, CT_RATE_FINDINGS, n_bootstrap=0, macro_subsets=CT_RATE_MACRO_SUBSETS)
    per_class = report["per_class"]
    fvlm = np.mean([per_class[f]["auroc"]["value"] for f in FVLM_FINDINGS])
    assert report["macro"]["fvlm_16"]["auroc"]["value"] == pytest.approx(fvlm)
    assert report["macro"]["ct_clip_18"]["auroc"]["value"] != pytest.approx(fvlm)
    with pytest.raises(ValueError, match="not in the evaluation"):
        classification_metrics(probs[:, :2], labels[:, :2], ["a", "b"], n_bootstrap=0, macro_subsets={"s": ["c"]})


# ---------------------------------------------------------------- region grounding and CoT


def test_top_regions_and_region_auroc():
    regions = torch.eye(3).repeat(2, 1, 1)  # (M=2, R=3, E=3): region r points along axis r
    findings = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.2]])  # finding 0 ~ region 1, finding 1 ~ region 0
    sim = finding_region_similarity(regions, findings)  # (M, K, R)
    assert sim.shape == (2, 2, 3) and sim[0, 0, 1] == pytest.approx(1.0)
    present = torch.tensor([[True, True, True], [True, False, True]])  # region 1 absent in case 1
    top = top_regions_per_finding(sim, present, ["f0", "f1"], ["r0", "r1", "r2"], top_k=2)
    assert top["f0"][0] == {"region": "r1", "mean_similarity": pytest.approx(1.0), "top1_fraction": pytest.approx(0.5)}
    assert top["f1"][0]["region"] == "r0" and top["f1"][0]["top1_fraction"] == pytest.approx(1.0)

    rng = np.random.default_rng(0)
    scores, labels = rng.random((12, 3)), (rng.random((12, 3)) < 0.5).astype(float)
    labels[:, 2] = 1.0
    labels[0, 0] = np.nan
    out = region_auroc(scores, labels, ["r0", "r1", "r2"])
    keep = ~np.isnan(labels)
    assert out["pooled"]["value"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
    assert out["per_region"]["r0"]["value"] == pytest.approx(roc_auc_score(labels[1:, 0], scores[1:, 0]))
    assert out["per_region"]["r2"] == {"value": None, "reason": "only positive cases", "n": 12, "n_positive": 12}


def test_text_patch_map_follows_the_patch_grid_order():
    grid = (2, 3, 4)  # (Z, Y, X)
    positions = patch_grid_positions(grid).float()  # (N, 3) rows (z, y, x), the encoder's token order
    local = torch.cat([torch.nn.functional.one_hot(torch.arange(24), 24).float(), positions], dim=1)  # (N, 27)
    target = int(((positions == torch.tensor([1.0, 2.0, 3.0])).all(1)).nonzero())
    heat = text_patch_similarity(local, local[target], grid)
    assert heat.shape == grid
    assert torch.equal(torch.tensor(np.unravel_index(int(heat.argmax()), grid)), torch.tensor([1, 2, 3]))


def test_region_slice_centroids_by_hand():
    positions = torch.tensor([[[0, 0, 0], [1, 0, 0], [3, 0, 0]]])  # (B=1, N=3, 3): z = 0, 1, 3
    patch_to_region = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # region 2 absent
    centroid = region_slice_centroids(patch_to_region, positions)
    assert centroid[0, 0].item() == pytest.approx((0 * 1 + 1 * 0.5) / 1.5)
    assert centroid[0, 1].item() == 3.0 and math.isnan(centroid[0, 2].item())


def test_cot_alignment_by_hand():
    regions = torch.eye(5)[None]  # (M=1, R=5, E=5)
    present = torch.tensor([[True, True, True, True, False]])
    z = torch.tensor([[0.0, 1.0, 2.0, 3.0, math.nan]])
    tags = torch.zeros(5, 5, dtype=torch.bool)
    tags[0, 0] = tags[1, 2] = tags[2, 3] = tags[3, 4] = True  # step 3 names an absent region: not scored
    steps = torch.stack([regions[0, 0], regions[0, 2], regions[0, 1], regions[0, 4], regions[0, 0]])
    out = cot_alignment(steps, torch.full((5,), 7), tags, torch.tensor([7]), regions, present, z)
    accuracy, order = out["step_region_accuracy"], out["step_order_consistency"]
    assert accuracy["value"] == pytest.approx(2 / 3) and accuracy["n_steps"] == 3
    assert accuracy["chance"] == pytest.approx(1 / 4)
    # tagged z (0, 2, 3), grounded z (0, 2, 1): pairs (0,1), (0,2) agree, (1,2) disagrees
    assert order["value"] == pytest.approx(2 / 3) and order["n_pairs"] == 3
    # two steps tagged at z = 0 and z = 2, both grounded in region 1: a tie in grounded order counts one half
    tied = cot_alignment(
        regions[0, [1, 1]],
        torch.tensor([7, 7]),
        torch.eye(5, dtype=torch.bool)[[0, 2]],
        torch.tensor([7]),
        regions,
        present,
        z,
    )
    assert (
        tied["step_order_consistency"] == {"value": 0.5, "n_pairs": 1} and tied["step_region_accuracy"]["value"] == 0.0
    )
    none = cot_alignment(
        steps, torch.full((5,), 7), torch.zeros(5, 5, dtype=torch.bool), torch.tensor([7]), regions, present, z
    )
    assert none["step_region_accuracy"]["value"] is None and "no step" in none["step_region_accuracy"]["reason"]
    with pytest.raises(ValueError, match="missing"):
        cot_alignment(steps, torch.full((5,), 8), tags, torch.tensor([7]), regions, present, z)


# ---------------------------------------------------------------- gathering and DDP


def test_gather_cases_single_process_dedups_and_sorts():
    key = torch.tensor([3, 1, 3, 0])
    values = {"x": torch.tensor([[30.0], [10.0], [31.0], [0.0]]), "flag": torch.tensor([True, False, False, True])}
    out_key, out = gather_cases(key, values)
    assert out_key.tolist() == [0, 1, 3]
    assert out["x"].flatten().tolist() == [0.0, 10.0, 30.0] and out["flag"].tolist() == [True, False, True]
    pairs, _ = gather_cases(torch.tensor([[2, 1], [0, 5], [2, 0], [0, 5]]), {})
    assert pairs.tolist() == [[0, 5], [2, 0], [2, 1]]
    with pytest.raises(ValueError, match="rows"):
        gather_cases(key, {"x": torch.zeros(3)})


def _ddp_data() -> dict:
    g = torch.Generator().manual_seed(0)
    m = 11
    labels = (torch.rand(m, 3, generator=g) < 0.5).double()
    labels[2, 1] = math.nan
    studies = [f"s{i // 2}" for i in range(m)]  # pairs of volumes share a study
    return {
        "image": torch.randn(m, 8, generator=g),
        "text": torch.randn(m, 8, generator=g),
        "keys": pair_keys(studies, [f"report {i // 2}" for i in range(m)]),
        "labels": labels,
        "prompts": torch.randn(3, 2, 1, 8, generator=g),
    }


def _evaluate(indices_per_batch: list[list[int]], data: dict) -> dict:
    """Feed the metrics batch by batch, as an evaluator would, and return their reports."""
    retrieval = RetrievalEvaluation(ks=(1, 5), tie_mode="mean")
    zero_shot = ZeroShotEvaluation(data["prompts"], 10.0, ["a", "b", "c"], n_bootstrap=25, macro_subsets=None)
    recall = RetrievalRecall(ks=(1,))
    for metric in (retrieval, zero_shot, recall):
        metric.reset()
    for idx in indices_per_batch:
        case = torch.tensor(idx)
        retrieval.update((case, data["image"][idx], data["text"][idx], data["keys"][idx]))
        zero_shot.update((case, data["image"][idx], data["labels"][idx]))
        recall.update((data["image"][idx], data["text"][idx], data["keys"][idx], case))
    return {"retrieval": retrieval.compute(), "zero_shot": zero_shot.compute(), "recall": recall.compute()}


def test_retrieval_evaluation_keeps_every_volume_on_request():
    data = _ddp_data()
    metric = RetrievalEvaluation(ks=(1,), one_per_study=False)
    metric.reset()
    metric.update((torch.arange(11), data["image"], data["text"], data["keys"]))
    report = metric.compute()
    assert report["protocol"]["pairs_evaluated"] == 11 and not report["protocol"]["one_per_study"]
    direct = retrieval_metrics(data["image"], data["text"], positive_groups(data["keys"]), (1,))
    assert _close(report["text_to_image"], direct["text_to_image"])


def _ddp_worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    init_gloo(rank, world, rendezvous)
    try:
        from torch.utils.data import DistributedSampler

        data = _ddp_data()
        shard = list(
            DistributedSampler(range(11), num_replicas=world, rank=rank, shuffle=False)
        )  # 6 each, case 0 twice
        reports = _evaluate([shard[i : i + 4] for i in range(0, len(shard), 4)], data)
        # uneven shards, one of them empty: rank 0 holds every case (one twice), rank 1 nothing
        accumulator = CaseAccumulator()
        if rank == 0:
            accumulator.update(torch.tensor([4, 0, 4]), {"image": data["image"][[4, 0, 4]]})
            accumulator.update(torch.arange(1, 11), {"image": data["image"][1:]})
        key, rows = accumulator.gather()
        reports["uneven_keys"] = key.tolist()
        reports["uneven_matches"] = bool(torch.equal(rows["image"], data["image"]))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(reports, f, allow_nan=False)
    finally:
        close_gloo()


def test_two_process_evaluation_equals_one_process(tmp_path):
    data = _ddp_data()
    single = _evaluate([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]], data)
    # the one-process reports are the direct computations on the whole set (one volume per study)
    keep = select_one_per_study(data["keys"][:, 0].tolist(), list(range(11)))
    assert keep == [0, 2, 4, 6, 8, 10]
    direct = retrieval_metrics(
        data["image"][keep], data["text"][keep], positive_groups(data["keys"][keep]), (1, 5), "mean"
    )
    assert _close(single["retrieval"]["image_to_text"], direct["image_to_text"])
    assert single["retrieval"]["protocol"]["pairs_evaluated"] == 6
    probs = zero_shot_probabilities(data["image"], data["prompts"], 10.0)
    assert _close(single["zero_shot"], classification_metrics(probs, data["labels"], ["a", "b", "c"], n_bootstrap=25))
    start_gloo_processes(_ddp_worker, (str(tmp_path),), tmp_path)
    for rank in (0, 1):
        ddp = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert ddp["uneven_keys"] == list(range(11)) and ddp["uneven_matches"]
        assert ddp["retrieval"]["protocol"]["cases"] == 11
        for name in ("retrieval", "zero_shot"):
            assert _close(ddp[name], single[name]), name
        assert ddp["recall"] == pytest.approx(single["recall"])


def _close(a, b) -> bool:
    """Equal nested JSON structures, floats within 1e-9."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= 1e-9
    return a == b
