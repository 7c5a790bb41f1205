"""The auxiliary segmentation and finding heads, and every multi-level term on a tiny encoder."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import packed_input, tiny_encoder
from scripts.losses import FindingLoss, MultiLevelLoss, region_text_inputs, step_inputs
from scripts.metrics import region_assignment_counts
from scripts.networks import FindingHead, HFTextEncoder, SegmentationAuxHead


def test_segmentation_head_logits_and_accuracy_by_hand():
    head = SegmentationAuxHead(embed_dim=2, num_regions=2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))  # background, region 1, region 2
        head.linear.bias.copy_(torch.tensor([0.5, 0.0, 0.0]))
    features = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]])  # (B=1, N=3, C=2)
    logits = head(features)
    assert torch.equal(logits, torch.tensor([[[0.5, 1.0, 0.0], [0.5, 0.0, 2.0], [0.5, 0.0, 0.0]]]))
    # targets: patch 0 mostly region 1 (right), patch 1 mostly background (wrong), patch 2 pure background (not counted)
    patch_to_region = torch.tensor([[[0.75, 0.0], [0.0, 0.25], [0.0, 0.0]]])
    background = torch.tensor([[0.25, 0.75, 1.0]])
    correct, counted = region_assignment_counts(logits, patch_to_region, background)
    assert (correct.item(), counted.item()) == (1, 2)
    with pytest.raises(ValueError, match="local_features"):
        head(torch.zeros(1, 3, 4))


@pytest.mark.parametrize("detach_features", [True, False])
def test_finding_head_is_a_linear_probe_when_detached(detach_features):
    encoder = torch.nn.Linear(4, 3)  # stands for the image encoder's global features
    head = FindingHead(embed_dim=3, num_findings=2, detach_features=detach_features)
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0]]))
        head.linear.bias.copy_(torch.tensor([0.0, 0.5]))
    features = torch.tensor([[2.0, 1.0, 3.0]])
    assert torch.equal(head(features), torch.tensor([[2.0, -1.5]]))
    logits = head(encoder(torch.randn(3, 4)))
    FindingLoss()(logits, torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, float("nan")]])).backward()
    assert head.linear.weight.grad.abs().sum() > 0
    assert (encoder.weight.grad is None) == detach_features
    with pytest.raises(ValueError, match="global_features"):
        head(torch.zeros(2, 5))


def test_every_term_on_a_tiny_encoder_trains_its_heads(region_map, tiny_bert_dir):
    torch.manual_seed(0)
    encoder = tiny_encoder(region_map)  # width 32, E = 16, R = 20, all three projection heads
    text = HFTextEncoder(tiny_bert_dir, projection_dim=16, max_length=32)
    r = encoder.num_regions
    seg_head, finding_head = SegmentationAuxHead(32, r), FindingHead(32, 18)
    labels = torch.zeros(2, 1, 8, 32, 32)
    labels[0, :, :, :16] = 10  # lung lobe (region 1) in the first half of CT 0
    labels[0, :, :, 16:, :8] = 51  # heart (region 8)
    labels[1, :, :4] = 10
    out = encoder.forward_features(packed_input(labels))
    region_text = [[""] * r for _ in range(2)]
    region_text[0][0] = region_text[1][0] = "The right upper lobe is clear."
    region_text[0][7] = "Cardiomegaly."
    texts, has_text, keys = region_text_inputs(region_text)
    region_text_emb = out["region_embedding"].new_zeros(2, r, 16)
    region_text_emb[has_text] = text(texts)
    report_emb, token_emb, token_mask = text.forward_with_tokens(["Clear lungs.", "Cardiomegaly, lungs clear."])
    steps, step_item, step_regions = step_inputs([[{"text": "Look at the heart.", "regions": [7, 4]}], []], r)
    loss = MultiLevelLoss(
        global_weight=1.0,
        region_weight=1.0,
        step_weight=1.0,
        local_weight=1.0,
        segmentation_weight=1.0,
        finding_weight=1.0,
    )
    terms = loss(
        logit_scale=torch.tensor(10.0),
        image_emb=out["global_embedding"],
        text_emb=report_emb,
        region_emb=out["region_embedding"],
        region_text_emb=region_text_emb,
        region_valid=out["region_present"] & has_text,
        region_text_keys=keys,
        region_is_normal=torch.zeros(2, r, dtype=torch.bool),
        step_emb=text(steps),
        step_item=step_item,
        step_regions=step_regions,
        step_region_emb=out["region_embedding"],
        step_region_present=out["region_present"],
        local_emb=out["local_embedding"],
        token_emb=token_emb,
        token_mask=token_mask,
        segmentation_logits=seg_head(out["local_features"]),
        patch_to_region=out["patch_to_region"],
        background_fraction=out["background_fraction"],
        finding_logits=finding_head(out["global_features"]),
        finding_labels=torch.tensor([[0.0] * 17 + [1.0], [float("nan")] * 18]),
    )
    assert set(terms) == {"loss", "global", "region", "step", "local", "segmentation", "finding"}
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in terms.values())
    terms["loss"].backward()
    heads = (encoder.global_head, encoder.local_head, encoder.region_head, text.projection, seg_head, finding_head)
    for module in heads:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
