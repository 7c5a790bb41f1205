"""The text tower on a tiny offline BERT, and the CLIP wrapper around both towers."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import packed_input, tiny_encoder
from scripts.networks import CTReportCLIP, HFTextEncoder


def test_text_embeddings_pooling_and_truncation(tiny_bert_dir):
    texts = ["No pleural effusion.", "Consolidation in the right lower lobe. " * 100]
    for pooling in ("cls", "mean"):
        encoder = HFTextEncoder(tiny_bert_dir, projection_dim=16, pooling=pooling, max_length=64).eval()
        emb = encoder(texts)
        assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    tokens = encoder.tokenize(texts)
    assert tokens["input_ids"].shape[1] == 64  # the long report was truncated, the short one padded
    # mean pooling ignores padding: the short text alone gives the same embedding
    assert torch.allclose(encoder(texts[:1]), emb[:1], atol=1e-5)
    assert encoder.model.pooler is None  # built without the unused pooler


def test_frozen_text_tower_trains_only_its_projection(tiny_bert_dir):
    frozen = HFTextEncoder(tiny_bert_dir, projection_dim=16, trainable=False).train()
    frozen(["Heart size normal."]).sum().backward()
    assert frozen.projection.weight.grad is not None
    assert all(p.grad is None for p in frozen.model.parameters())
    assert not frozen.model.training  # dropout stays off in a frozen tower
    trainable = HFTextEncoder(tiny_bert_dir, projection_dim=16, trainable=True).train()
    trainable(["Heart size normal."]).sum().backward()
    assert all(p.grad is not None for p in trainable.model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="text_trainable must be True or False"):
        HFTextEncoder(tiny_bert_dir, trainable="false")
    with pytest.raises(ValueError, match="pooling"):
        HFTextEncoder(tiny_bert_dir, pooling="max")
    with pytest.raises(ValueError, match="text model folder /nonexistent/bert does not exist"):
        HFTextEncoder("/nonexistent/bert")


def test_clip_wrapper_outputs_and_logit_scale(tiny_bert_dir, region_map):
    model = CTReportCLIP(tiny_encoder(region_map), HFTextEncoder(tiny_bert_dir, projection_dim=16))
    assert math.isclose(model.logit_scale().item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.log_logit_scale.fill_(10.0)
    assert math.isclose(model.logit_scale().item(), 100.0, rel_tol=1e-5)  # clamped at 100
    out = model(packed_input(torch.randint(0, 118, (2, 1, 8, 32, 32))), ["a", "b"])
    assert out["image_features"]["global_embedding"].shape == out["text_embedding"].shape == (2, 16)
    with pytest.raises(ValueError, match="embedding width"):
        CTReportCLIP(tiny_encoder(region_map), HFTextEncoder(tiny_bert_dir, projection_dim=8))
