"""The loss terms against hand-computed values, false-negative handling, masking and the DDP gather."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from conftest import close_gloo, init_gloo, start_gloo_processes
from scripts.losses import (
    ContrastiveInfoNCELoss,
    FindingLoss,
    LocalAlignmentLoss,
    MultiLevelLoss,
    RegionSentenceLoss,
    SegmentationLoss,
    StepRegionLoss,
    gather_keys,
    gather_with_grad,
    pair_keys,
    positive_groups,
    region_soft_targets,
    region_text_inputs,
    step_inputs,
    text_key,
    token_patch_similarity,
)
from scripts.metrics import region_assignment_counts
from scripts.networks import HFTextEncoder


def test_infonce_two_by_two_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    scale = torch.tensor(2.0)
    # logits = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]
    row0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(1.2)))
    row1 = -math.log(math.exp(1.6) / (math.exp(0) + math.exp(1.6)))
    col0 = -math.log(math.exp(2) / (math.exp(2) + math.exp(0)))
    col1 = -math.log(math.exp(1.6) / (math.exp(1.2) + math.exp(1.6)))
    expected = ((row0 + row1) / 2 + (col0 + col1) / 2) / 2
    loss = ContrastiveInfoNCELoss()(image, text, scale)
    assert abs(loss.item() - expected) < 1e-6


def test_false_negatives_become_soft_positives():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = image.clone()
    scale = torch.tensor(3.0)
    logits = 3.0 * image @ text.T
    # items 0 and 1 share a study: each row's target is 1/2 on both
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    expected = (
        -(targets * logits.log_softmax(1)).sum(1).mean() - (targets * logits.T.log_softmax(1)).sum(1).mean()
    ) / 2
    groups = positive_groups(pair_keys(["s1", "s1", "s2"], ["a", "b", "c"]))
    assert groups.tolist() == [0, 0, 2]
    loss = ContrastiveInfoNCELoss()(image, text, scale, groups)
    assert torch.allclose(loss, expected)
    # and it differs from treating item 1 as a negative of item 0
    assert not torch.allclose(loss, ContrastiveInfoNCELoss()(image, text, scale))


def test_groups_join_same_study_or_identical_report_transitively():
    keys = pair_keys(["a", "b", "c", "d", "e"], ["x", "y", "y  ", "z", "w"])
    keys[3, 0] = keys[2, 0]  # d shares c's study; c shares b's report (whitespace-normalised)
    assert positive_groups(keys).tolist() == [0, 1, 1, 1, 4]


def _ddp_worker(rank: int, world: int, rendezvous: str, image: torch.Tensor, text: torch.Tensor, result: str) -> None:
    init_gloo(rank, world, rendezvous)
    try:
        model = torch.nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            model.weight.copy_(torch.eye(4))
        shard = slice(rank * 2, rank * 2 + 2)
        keys = pair_keys([f"s{i}" for i in range(4)][shard], [f"t{i}" for i in range(4)][shard])
        groups = positive_groups(gather_keys(keys))
        loss = ContrastiveInfoNCELoss()(
            gather_with_grad(model(image[shard])), gather_with_grad(text[shard]), torch.tensor(5.0), groups
        )
        loss.backward()
        dist.all_reduce(model.weight.grad)  # what DDP does after backward: average the ranks' gradients
        model.weight.grad /= world
        if rank == 0:
            torch.save((loss.detach(), model.weight.grad.clone()), result)
    finally:
        close_gloo()


def test_ddp_gather_gives_the_single_process_gradient(tmp_path):
    torch.manual_seed(0)
    image, text = torch.randn(4, 4), torch.randn(4, 4)
    single = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        single.weight.copy_(torch.eye(4))
    loss = ContrastiveInfoNCELoss()(
        single(image), text, torch.tensor(5.0), positive_groups(pair_keys(list("abcd"), list("wxyz")))
    )
    loss.backward()
    result = tmp_path / "rank0.pt"
    start_gloo_processes(_ddp_worker, (image, text, str(result)), tmp_path)
    ddp_loss, ddp_grad = torch.load(result, weights_only=True)
    assert torch.allclose(ddp_loss, loss.detach(), atol=1e-6)
    assert torch.allclose(ddp_grad, single.weight.grad, atol=1e-6)


def _two_way_infonce(logits: list[list[float]], targets: list[list[float]]) -> float:
    """Hand InfoNCE of a tiny matrix with soft targets: mean of the row and column cross-entropies."""

    def rows(m, t):
        out = []
        for row, trow in zip(m, t):
            norm = math.log(sum(math.exp(v) for v in row))
            out.append(-sum(tv * (v - norm) for v, tv in zip(row, trow)))
        return sum(out) / len(out)

    transpose = [list(c) for c in zip(*logits)]
    return (rows(logits, targets) + rows(transpose, [list(c) for c in zip(*targets)])) / 2


# the 2 x 2 case of test_infonce_two_by_two_by_hand: logits = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]
IMAGE_2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
TEXT_2 = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
LOGITS_2 = [[2.0, 1.2], [0.0, 1.6]]


def test_region_soft_targets_for_identical_and_normal_texts():
    valid = torch.ones(3, 1, dtype=torch.bool)
    keys = torch.tensor([[text_key("Lungs are clear.")], [text_key("Lungs  are clear.")], [text_key("Nodule.")]])
    targets = region_soft_targets(valid, keys, torch.zeros(3, 1, dtype=torch.bool))
    assert torch.equal(targets[0], torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    # different wording, both the region's normal template: positives too; an invalid item drops out
    keys = torch.tensor([[1], [2], [3]])
    is_normal = torch.tensor([[True], [False], [True]])
    targets = region_soft_targets(torch.tensor([[True], [True], [True]]), keys, is_normal)
    assert torch.equal(targets[0], torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]))
    targets = region_soft_targets(torch.tensor([[True], [False], [True]]), keys, torch.ones(3, 1, dtype=torch.bool))
    assert torch.equal(targets[0], torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0], [0.5, 0.0, 0.5]]))


def test_region_loss_by_hand_and_single_item_regions_left_out():
    # region 0: both items valid, the 2 x 2 case; region 1: only item 0 valid (1 x 1, left out of the mean)
    region = torch.stack([IMAGE_2, torch.tensor([[0.0, 1.0], [1.0, 0.0]])], dim=1)  # (B=2, R=2, E=2)
    text = torch.stack([TEXT_2, torch.tensor([[1.0, 0.0], [0.0, 1.0]])], dim=1)
    valid = torch.tensor([[True, True], [True, False]])
    keys = torch.tensor([[1, 3], [2, 4]])
    loss = RegionSentenceLoss()(region, text, valid, keys, torch.zeros(2, 2, dtype=torch.bool), torch.tensor(2.0))
    expected = _two_way_infonce(LOGITS_2, [[1, 0], [0, 1]])
    assert abs(loss.item() - expected) < 1e-6
    # both texts normal templates of the region: soft targets 1/2 everywhere
    is_normal = torch.tensor([[True, False], [True, False]])
    loss = RegionSentenceLoss()(region, text, valid, keys, is_normal, torch.tensor(2.0))
    assert abs(loss.item() - _two_way_infonce(LOGITS_2, [[0.5, 0.5], [0.5, 0.5]])) < 1e-6
    assert abs(loss.item() - expected) > 1e-2
    with pytest.raises(ValueError, match="valid"):
        RegionSentenceLoss()(region, text, valid[:, :1], keys, is_normal, torch.tensor(2.0))


def test_step_loss_by_hand():
    region = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])  # (B=1, R=3, E=2)
    present = torch.tensor([[True, True, False]])
    steps = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # (S=3, E)
    named = torch.tensor([[True, False, True], [True, True, False], [False, False, True]])
    scale = 2.0
    loss = StepRegionLoss()(steps, torch.zeros(3, dtype=torch.long), named, region, present, torch.tensor(scale))
    # step 0 names {0, 2}, 2 is absent: logits over present {0, 1} = [2, 0], target region 0
    step0 = -math.log(math.exp(2) / (math.exp(2) + 1))
    # step 1 names {0, 1}: logits [1.2, 1.6], target [1/2, 1/2]; step 2 names only the absent region: skipped
    norm = math.log(math.exp(1.2) + math.exp(1.6))
    step1 = -(0.5 * (1.2 - norm) + 0.5 * (1.6 - norm))
    assert abs(loss.item() - (step0 + step1) / 2) < 1e-6
    # no step with a named present region, and no step at all: an exact 0 that backpropagates
    region.requires_grad_(True)
    for keep in (slice(2, 3), slice(0, 0)):
        items = torch.zeros(3, dtype=torch.long)[keep]
        zero = StepRegionLoss()(steps[keep], items, named[keep], region, present, torch.tensor(scale))
        zero.backward()
        assert zero.item() == 0.0 and torch.count_nonzero(region.grad) == 0
    with pytest.raises(ValueError, match="outside"):
        StepRegionLoss()(steps, torch.tensor([0, 0, 1]), named, region, present, torch.tensor(scale))


def test_absent_region_finite_loss_and_zero_gradient():
    torch.manual_seed(0)
    b, r, c, e = 3, 3, 8, 4
    region_features = torch.randn(b, r, c, requires_grad=True)
    head = torch.nn.Linear(c, e, bias=False)  # the shared region projection
    region_emb = torch.nn.functional.normalize(head(region_features), dim=-1)
    present = torch.tensor([[True, True, False], [True, False, False], [True, True, False]])  # region 2 nowhere
    has_text = torch.tensor([[True, True, True], [True, True, True], [True, False, True]])
    steps = torch.randn(3, e)
    loss = MultiLevelLoss(global_weight=0.0, region_weight=1.0, step_weight=0.5)(
        logit_scale=torch.tensor(10.0),
        region_emb=region_emb,
        region_text_emb=torch.randn(b, r, e),
        region_valid=present & has_text,
        region_text_keys=torch.arange(b * r).view(b, r),
        region_is_normal=torch.zeros(b, r, dtype=torch.bool),
        step_emb=steps,
        step_item=torch.tensor([0, 1, 2]),
        step_regions=torch.tensor([[True, False, True], [False, False, True], [False, True, True]]),
        step_region_emb=region_emb,
        step_region_present=present,
    )
    loss["loss"].backward()
    assert torch.isfinite(loss["loss"]) and loss["region"] > 0 and loss["step"] > 0
    assert torch.count_nonzero(region_features.grad[:, 2]) == 0  # the absent region: exactly zero
    assert torch.count_nonzero(region_features.grad[1, 1]) == 0  # absent in item 1 alone: zero there too
    assert torch.count_nonzero(region_features.grad[:, 0]) > 0
    # no valid pair at all: an exact 0 that backpropagates
    region_features.grad = None
    zero = RegionSentenceLoss()(
        torch.nn.functional.normalize(head(region_features), dim=-1),
        torch.randn(b, r, e),
        torch.zeros(b, r, dtype=torch.bool),
        torch.zeros(b, r, dtype=torch.long),
        torch.ones(b, r, dtype=torch.bool),
        torch.tensor(10.0),
    )
    zero.backward()
    assert zero.item() == 0.0 and torch.count_nonzero(region_features.grad) == 0


# FILIP case: CT 0 patches [1, 0], [0, 1]; CT 1 patches [.6, .8], [.8, .6]; text 0 tokens [1, 0], [.6, .8];
# text 1 tokens [0, 1] and a padding token [1, 0] that must not count
LOCAL = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [0.8, 0.6]]])
TOKENS = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [1.0, 0.0]]])
TOKEN_MASK = torch.tensor([[True, True], [True, False]])


def test_token_patch_similarity_and_local_loss_by_hand():
    image_to_text, text_to_image = token_patch_similarity(LOCAL, TOKENS, TOKEN_MASK)
    # best token per patch, mean over patches: e.g. CT 1 x text 0: max(.6, 1) and max(.8, .96) -> .98
    assert torch.allclose(image_to_text, torch.tensor([[0.9, 0.5], [0.98, 0.7]]))
    # best patch per real token, mean over tokens: e.g. CT 0 x text 1: token [0, 1] -> 1
    assert torch.allclose(text_to_image, torch.tensor([[0.9, 1.0], [0.9, 0.8]]))
    loss = LocalAlignmentLoss()(LOCAL, TOKENS, TOKEN_MASK, torch.tensor(2.0))
    image_rows = [
        -math.log(math.exp(1.8) / (math.exp(1.8) + math.exp(1.0))),
        -math.log(math.exp(1.4) / (math.exp(1.96) + math.exp(1.4))),
    ]
    text_rows = [math.log(2.0), -math.log(math.exp(1.6) / (math.exp(2.0) + math.exp(1.6)))]
    assert abs(loss.item() - (sum(image_rows) / 2 + sum(text_rows) / 2) / 2) < 1e-6
    # one group: both texts are positives of both CTs
    grouped = LocalAlignmentLoss()(LOCAL, TOKENS, TOKEN_MASK, torch.tensor(2.0), torch.tensor([0, 0]))
    assert abs(grouped.item() - loss.item()) > 1e-3
    with pytest.raises(ValueError, match="no token"):
        token_patch_similarity(LOCAL, TOKENS, torch.tensor([[True, True], [False, False]]))


def test_chunked_token_patch_similarity_matches_the_dense_reference():
    torch.manual_seed(0)
    local = torch.nn.functional.normalize(torch.randn(3, 5, 4), dim=-1).requires_grad_(True)
    tokens = torch.nn.functional.normalize(torch.randn(3, 6, 4), dim=-1).requires_grad_(True)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [True] * 2 + [False] * 4])
    fast = token_patch_similarity(local, tokens, mask)
    fast_grad = torch.autograd.grad(fast[0].sum() + 2 * fast[1].sum(), (local, tokens))
    sim = torch.einsum("ine,jle->ijnl", local, tokens)  # (B_img, B_txt, N, L), the dense reference
    image_to_text = sim.masked_fill(~mask[None, :, None, :], float("-inf")).max(3).values.mean(2)
    text_to_image = (sim.max(2).values * mask[None]).sum(2) / mask.sum(1)[None]
    dense_grad = torch.autograd.grad(image_to_text.sum() + 2 * text_to_image.sum(), (local, tokens))
    assert torch.allclose(fast[0], image_to_text, atol=1e-6) and torch.allclose(fast[1], text_to_image, atol=1e-6)
    assert all(torch.allclose(f, d, atol=1e-6) for f, d in zip(fast_grad, dense_grad))


@pytest.mark.parametrize("autocast", [False, True])
def test_local_loss_saves_no_similarity_block_for_backward(autocast):
    b, n, length, e = 4, 256, 32, 32
    local = torch.nn.functional.normalize(torch.randn(b, n, e), dim=-1).requires_grad_(True)
    tokens = torch.nn.functional.normalize(torch.randn(b, length, e), dim=-1).requires_grad_(True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", enabled=autocast):
        LocalAlignmentLoss()(local, tokens, torch.ones(b, length, dtype=torch.bool), torch.tensor(5.0))
    inputs = (local.numel() + tokens.numel()) * 4  # 144 KiB
    indices = b * b * (n + length) * 8  # arg-max indices of every (CT, text) pair: 36 KiB
    # a saved (B_img, N, L) block per text would add 512 KiB; a bfloat16 copy of local per text 256 KiB
    assert sum(saved.values()) <= inputs + indices + 8 * 1024


def test_text_tokens_feed_the_local_loss(tiny_bert_dir):
    texts = ["No pleural effusion.", "Consolidation in the right lower lobe with air bronchograms."]
    encoder = HFTextEncoder(tiny_bert_dir, projection_dim=8, pooling="cls", max_length=64).eval()
    embedding, tokens, mask = encoder.forward_with_tokens(texts)
    assert torch.allclose(embedding, encoder(texts), atol=1e-6)
    assert torch.equal(mask, encoder.tokenize(texts)["attention_mask"].bool()) and mask.dtype == torch.bool
    assert tokens.shape == (2, mask.shape[1], 8) and torch.allclose(
        tokens.norm(dim=-1), torch.ones(mask.shape), atol=1e-5
    )
    assert torch.allclose(tokens[:, 0], embedding, atol=1e-6)  # [CLS] token = the cls-pooled embedding
    local = torch.nn.functional.normalize(torch.randn(2, 6, 8), dim=-1).requires_grad_(True)
    LocalAlignmentLoss()(local, tokens, mask, torch.tensor(10.0)).backward()
    assert encoder.projection.weight.grad.abs().sum() > 0 and local.grad.abs().sum() > 0


def test_segmentation_loss_and_assignment_counts_by_hand():
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0], [0.0, 0.0, math.log(3.0)], [1.0, 0.0, 0.0]]])  # (1, 3, R+1=3)
    patch_to_region = torch.tensor([[[0.5, 0.0], [0.25, 0.25], [0.0, 0.0]]])
    background = torch.tensor([[0.5, 0.5, 1.0]])
    # softmax rows: [1/4, 1/2, 1/4], [1/5, 1/5, 3/5], [e/(e+2), 1/(e+2), 1/(e+2)]
    patch0 = -(0.5 * math.log(1 / 4) + 0.5 * math.log(1 / 2))
    patch1 = -(0.5 * math.log(1 / 5) + 0.25 * math.log(1 / 5) + 0.25 * math.log(3 / 5))
    patch2 = -math.log(math.e / (math.e + 2))
    loss = SegmentationLoss()(logits, patch_to_region, background)
    assert abs(loss.item() - (patch0 + patch1 + patch2) / 3) < 1e-6
    # patch 0: head 1, target 0 (tie goes to background) -> wrong; patch 1: head 2, target 0 -> wrong;
    # patch 2 is pure background, not counted
    correct, counted = region_assignment_counts(logits, patch_to_region, background)
    assert (correct.item(), counted.item()) == (0, 2)
    patch_to_region = torch.tensor([[[0.5, 0.0], [0.0, 0.75], [0.0, 0.0]]])
    correct, _ = region_assignment_counts(logits, patch_to_region, torch.tensor([[0.5, 0.25, 1.0]]))
    assert correct.item() == 1  # patch 1's target is now region 2
    with pytest.raises(ValueError, match="R \\+ 1"):
        SegmentationLoss()(logits[..., :2], patch_to_region, background)


def test_finding_loss_masks_unknown_labels_by_hand():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    loss = FindingLoss()(logits, labels)
    assert abs(loss.item() - (math.log(2.0) + math.log(1 + math.exp(-1.0))) / 2) < 1e-6
    loss.backward()
    assert logits.grad[:, 1].eq(0).all() and logits.grad[:, 0].ne(0).all()
    logits.grad = None
    unknown = FindingLoss()(logits, torch.full((2, 2), float("nan")))
    unknown.backward()
    assert unknown.item() == 0.0 and logits.grad.eq(0).all()


def test_multilevel_loss_sums_enabled_terms_only():
    image, text = IMAGE_2.clone(), TEXT_2.clone()
    finding_logits, labels = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    out = MultiLevelLoss(global_weight=1.0, finding_weight=0.5)(
        logit_scale=torch.tensor(2.0),
        image_emb=image,
        text_emb=text,
        finding_logits=finding_logits,
        finding_labels=labels,
    )
    expected_global = _two_way_infonce(LOGITS_2, [[1, 0], [0, 1]])
    assert set(out) == {"loss", "global", "finding"}
    assert abs(out["global"].item() - expected_global) < 1e-6 and abs(out["finding"].item() - math.log(2.0)) < 1e-6
    assert abs(out["loss"].item() - (expected_global + 0.5 * math.log(2.0))) < 1e-6
    loss = MultiLevelLoss(global_weight=0.0, segmentation_weight=1.0)
    assert loss.enabled == ("segmentation",) and set(loss.terms) == {"segmentation"}  # nothing else is built
    for bad in ({"region_weight": -1.0}, {"step_weight": float("nan")}, {"global_weight": 0.0}):
        with pytest.raises(ValueError, match="weight"):
            MultiLevelLoss(**bad)
    with pytest.raises(ValueError, match=r"the local term .* needs \['token_emb', 'token_mask'\]"):
        MultiLevelLoss(local_weight=1.0)(logit_scale=torch.tensor(2.0), image_emb=image, text_emb=text, local_emb=LOCAL)


@pytest.mark.parametrize("region_weight, step_weight", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0)])
def test_gradients_reach_region_and_step_projections_only_when_on(region_weight, step_weight):
    torch.manual_seed(0)
    b, r, c, e = 2, 3, 6, 4
    image_head = torch.nn.Linear(c, e, bias=False)  # the encoder's global projection
    region_head = torch.nn.Linear(c, e, bias=False)  # the encoder's region projection
    sentence_projection = torch.nn.Linear(c, e, bias=False)  # text side of the region sentences
    step_projection = torch.nn.Linear(c, e, bias=False)  # text side of the steps
    region_emb = torch.nn.functional.normalize(region_head(torch.randn(b, r, c)), dim=-1)
    present = torch.ones(b, r, dtype=torch.bool)
    out = MultiLevelLoss(global_weight=1.0, region_weight=region_weight, step_weight=step_weight)(
        logit_scale=torch.tensor(5.0),
        image_emb=image_head(torch.randn(b, c)),
        text_emb=torch.randn(b, e),
        region_emb=region_emb,  # every input is given: a disabled term must still not be computed
        region_text_emb=sentence_projection(torch.randn(b, r, c)),
        region_valid=present,
        region_text_keys=torch.arange(b * r).view(b, r),
        region_is_normal=torch.zeros(b, r, dtype=torch.bool),
        step_emb=step_projection(torch.randn(2, c)),
        step_item=torch.tensor([0, 1]),
        step_regions=torch.tensor([[True, False, False], [False, True, True]]),
        step_region_emb=region_emb,
        step_region_present=present,
    )
    out["loss"].backward()
    assert ("region" in out) == bool(region_weight) and ("step" in out) == bool(step_weight)
    assert image_head.weight.grad.abs().sum() > 0

    def reached(module):
        return module.weight.grad is not None and bool(module.weight.grad.abs().sum() > 0)

    assert reached(region_head) == bool(region_weight or step_weight)
    assert reached(sentence_projection) == bool(region_weight)
    assert reached(step_projection) == bool(step_weight)


def test_region_and_step_batch_helpers():
    texts, has_text, keys = region_text_inputs([["Lungs clear.", "", "Heart normal."], ["", "Trachea patent.", ""]])
    assert texts == ["Lungs clear.", "Heart normal.", "Trachea patent."]
    assert has_text.tolist() == [[True, False, True], [False, True, False]]
    assert keys[0, 0].item() == text_key("Lungs  clear.") and keys[0, 1].item() == 0
    emb = torch.eye(3, requires_grad=True)  # stands for the encoder's (M, E) output
    region_text_emb = emb.new_zeros(2, 3, 3)
    region_text_emb[has_text] = emb
    assert torch.equal(region_text_emb[1, 1], emb[2])  # scattered back in the flattening order
    region_text_emb.sum().backward()
    assert emb.grad.eq(1).all()
    with pytest.raises(ValueError, match="item 1 has 2 regions"):
        region_text_inputs([["a", "b", "c"], ["a", "b"]])
    cot = [
        [{"text": "Check the lungs.", "regions": [0, 2]}, {"text": "Overall.", "regions": []}],
        [{"text": "Heart.", "regions": [1]}],
    ]
    texts, items, named = step_inputs(cot, num_regions=3)
    assert texts == ["Check the lungs.", "Heart."] and items.tolist() == [0, 1]
    assert named.tolist() == [[True, False, True], [False, True, False]]
    assert step_inputs([[], []], num_regions=3)[2].shape == (0, 3)
    with pytest.raises(ValueError, match="item 1 step 0"):
        step_inputs([[], [{"text": "x", "regions": [3]}]], num_regions=3)
