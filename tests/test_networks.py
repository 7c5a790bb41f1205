"""The encoder's parts against hand-computed values, reference paths and the seed specification."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import packed_input, tiny_encoder
from scripts.networks import AnatomyAwareCTEncoder, PatchEmbedding3D, RegionCrossAttention, SliceAwareSelfAttention
from scripts.networks.patch_embedding import patch_grid_positions
from scripts.networks.slice_attention import slice_distance_index

# parameter counts of the seed configuration (dim 768, depth 12, 12 heads, patch (4, 16, 16), input
# (64, 512, 512), 20 regions, E = 512), recorded in docs/README.md
SEED_PARAMS_GLOBAL_HEAD = 114_703_872
SEED_PARAMS_PLAIN_BLOCKS = 86_313_984


def test_seed_patch_embedding_shape():
    embed = PatchEmbedding3D(1, 768, (4, 16, 16), (16, 32, 32))
    with torch.no_grad():
        tokens, grid = embed(torch.zeros(2, 1, 64, 512, 512))
    assert tokens.shape == (2, 16385, 768)
    assert grid == (16, 32, 32)


def test_seed_configuration_builds_with_documented_size(region_map):
    full = AnatomyAwareCTEncoder(region_map.class_ids, projection_heads=("global",))
    plain = AnatomyAwareCTEncoder(region_map.class_ids, projection_heads=("global",), block_type="plain")
    assert sum(p.numel() for p in full.parameters()) == SEED_PARAMS_GLOBAL_HEAD
    assert sum(p.numel() for p in plain.parameters()) == SEED_PARAMS_PLAIN_BLOCKS
    # a plain block builds no cross-attention and no slice-bias table
    assert plain.blocks[0].cross is None and plain.blocks[0].attn.slice_bias is None
    assert full.blocks[0].attn.slice_bias.shape == (12, 32)


def test_seed_widths_output_shapes_at_reduced_size(region_map):
    net = AnatomyAwareCTEncoder(region_map.class_ids).eval()
    labels = torch.randint(0, 118, (2, 1, 8, 32, 48))
    with torch.no_grad():
        out = net.forward_features(packed_input(labels))
    n = 2 * 2 * 3  # (8 / 4) * (32 / 16) * (48 / 16) patches
    expected = {
        "global_features": (2, 768),
        "local_features": (2, n, 768),
        "region_features": (2, 20, 768),
        "cls_token": (2, 768),
        "patch_positions": (2, n, 3),
        "patch_to_region": (2, n, 20),
        "background_fraction": (2, n),
        "region_present": (2, 20),
        "global_embedding": (2, 512),
        "local_embedding": (2, n, 512),
        "region_embedding": (2, 20, 512),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert torch.equal(out["patch_positions"][0, -1], torch.tensor([1, 1, 2]))
    assert torch.allclose(out["global_embedding"].norm(dim=-1), torch.ones(2))


def test_patch_to_region_is_fraction_of_voxels(region_map):
    net = tiny_encoder(region_map)
    labels = torch.randint(0, 118, (2, 1, 8, 32, 32))
    assignment = net.anatomy.assign(labels.float())
    rows = assignment["patch_to_region"].sum(-1) + assignment["background_fraction"]
    assert torch.allclose(rows, torch.ones_like(rows))
    # brute force: one-hot of the remapped map, averaged over each (4, 8, 8) patch
    regions = net.anatomy.class_to_region[labels[:, 0]]  # (B, D, H, W)
    onehot = F.one_hot(regions, 21).permute(0, 4, 1, 2, 3).float()
    expected = F.avg_pool3d(onehot, (4, 8, 8)).flatten(2).transpose(1, 2)  # (B, N, R + 1)
    assert torch.allclose(assignment["patch_to_region"], expected[..., 1:], atol=1e-6)
    # liver (TotalSegmentator 5) and gallbladder (4) both land in the liver_gallbladder region
    liver = region_map.names.index("liver_gallbladder") + 1
    assert net.anatomy.class_to_region[5] == liver and net.anatomy.class_to_region[4] == liver


@pytest.mark.parametrize("slab_voxels", [1, 2 * 3 * 4 * 16 * 24, 1 << 30])
def test_patch_to_region_in_slabs_with_ids_outside_the_map(region_map, slab_voxels):
    """One patch row per count, two (2 + 2 + 1 of 5 rows), or all at once: the same fractions; ids < 0 or > 117
    (and non-integer floats, rounded) count as background."""
    net = tiny_encoder(region_map)
    net.anatomy.slab_voxels = slab_voxels
    labels = torch.randint(-3, 125, (3, 1, 20, 16, 24)).float()
    labels[0, 0, 0, 0, :3] = torch.tensor([4.9999, 5.2, -0.4])  # -> 5 (liver), 5, 0
    assignment = net.anatomy.assign(labels)
    ids = labels.round().long()[:, 0]
    regions = net.anatomy.class_to_region[ids.clamp(0, 117)].masked_fill((ids < 0) | (ids > 117), 0)
    expected = F.avg_pool3d(F.one_hot(regions, 21).permute(0, 4, 1, 2, 3).float(), (4, 8, 8))
    expected = expected.flatten(2).transpose(1, 2)  # (B, N, R + 1)
    assert torch.allclose(assignment["patch_to_region"], expected[..., 1:], atol=1e-6)
    assert torch.allclose(assignment["background_fraction"], expected[..., 0], atol=1e-6)


def test_absent_region_and_empty_mask_give_finite_features(region_map):
    net = tiny_encoder(region_map).eval()
    labels = torch.zeros(1, 1, 8, 32, 32)
    labels[..., :4, :, :] = 5  # liver in the lower half only; every other region absent
    with torch.no_grad():
        out = net.forward_features(packed_input(labels))
        empty = net.forward_features(packed_input(torch.zeros(1, 1, 8, 32, 32)))
    liver = region_map.names.index("liver_gallbladder")
    assert out["region_present"][0].nonzero().flatten().tolist() == [liver]
    for result in (out, empty):
        assert all(torch.isfinite(v.float()).all() for v in result.values())
    absent = torch.ones(20, dtype=torch.bool)
    absent[liver] = False
    # an absent region's token is its region embedding alone
    assert torch.allclose(out["region_features"][0, absent], net.anatomy.region_embedding[absent], atol=1e-6)
    assert not empty["region_present"].any()


def test_background_patches_get_no_cross_attention_update():
    cross = RegionCrossAttention(16, 4)
    patches, regions = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    weights = torch.zeros(2, 6, 3)
    weights[0, :3, 1] = 0.5  # half-foreground patches in item 0
    out = cross(patches, regions, weights)
    assert torch.all(out[1] == 0) and torch.all(out[0, 3:] == 0)
    assert out[0, :3].abs().sum() > 0


def test_slice_distance_index():
    slices = torch.tensor([-1, 0, 0, 1, 40])
    index = slice_distance_index(slices, 32)
    assert index[0].tolist() == [0, 0, 0, 0, 0] and index[:, 0].tolist() == [0, 0, 0, 0, 0]
    assert index[1].tolist() == [0, 0, 0, 1, 31]
    assert index[3, 4] == 31 and index[4, 3] == 31


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_attention_matches_explicit_softmax(impl):
    torch.manual_seed(0)
    attn = SliceAwareSelfAttention(32, 4, attention_impl=impl)
    with torch.no_grad():
        attn.slice_bias.normal_()
    slices = F.pad(patch_grid_positions((3, 2, 2))[:, 0], (1, 0), value=-1)
    x = torch.randn(2, 13, 32)
    q, k, v = attn.qkv(x).view(2, 13, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8) + attn.slice_bias[:, slice_distance_index(slices, 32)]
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 13, 32))
    assert torch.allclose(attn(x, slices, 3), expected, atol=1e-5)


def test_flex_attention_matches_reference_forward():
    """The compiled FlexAttention path against the SDPA reference (forward; CPU has no flex backward)."""
    torch.manual_seed(0)
    attn = SliceAwareSelfAttention(32, 4, attention_impl="reference")
    with torch.no_grad():
        attn.slice_bias.normal_()
    slices = F.pad(patch_grid_positions((4, 2, 2))[:, 0], (1, 0), value=-1)
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        reference = attn(x, slices, 4)
        attn.attention_impl = "flex"
        fast = attn(x, slices, 4)
    assert torch.allclose(fast, reference, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")
def test_flex_attention_matches_reference_backward_cuda():
    torch.manual_seed(0)
    attn = SliceAwareSelfAttention(64, 4).cuda()
    with torch.no_grad():
        attn.slice_bias.normal_()
    slices = F.pad(patch_grid_positions((4, 4, 4))[:, 0], (1, 0), value=-1).cuda()
    x = torch.randn(2, 65, 64, device="cuda", requires_grad=True)
    grads = []
    for impl in ("reference", "flex"):
        attn.attention_impl = impl
        grads.append(torch.autograd.grad(attn(x, slices, 4).square().sum(), [x, attn.slice_bias]))
    for ref, fast in zip(*grads):
        assert torch.allclose(ref, fast, atol=1e-3, rtol=1e-3)


def test_every_parameter_gets_a_gradient(region_map):
    net = tiny_encoder(region_map).train()
    labels = torch.randint(0, 118, (2, 1, 8, 32, 32))
    out = net.forward_features(packed_input(labels))
    loss = sum(out[k].sum() for k in ("global_embedding", "local_embedding", "region_embedding"))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gradient_checkpointing_keeps_outputs_and_gradients(region_map):
    torch.manual_seed(0)
    net = tiny_encoder(region_map).train()
    image = packed_input(torch.randint(0, 118, (2, 1, 8, 32, 32)))
    results = []
    for flag in (False, True):
        net.gradient_checkpointing = flag
        net.zero_grad()
        emb = net(image)
        emb.square().sum().backward()
        results.append((emb.detach(), net.patch_embed.proj.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


@pytest.mark.parametrize("pos_embed_type", ["learned", "sinusoidal"])
def test_other_input_sizes_and_positional_embeddings(region_map, pos_embed_type):
    net = tiny_encoder(region_map, pos_embed_type=pos_embed_type).eval()
    for size in ((8, 32, 32), (12, 16, 48)):
        with torch.no_grad():
            emb = net(packed_input(torch.randint(0, 118, (1, 1, *size))))
        assert emb.shape == (1, 16) and torch.isfinite(emb).all()
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        net(packed_input(torch.zeros(1, 1, 8, 30, 32)))
    with pytest.raises(ValueError, match=r"\(B, 2, D, H, W\)"):
        net(torch.zeros(1, 1, 8, 32, 32))


def test_eval_is_deterministic(region_map):
    net = tiny_encoder(region_map).eval()
    image = packed_input(torch.randint(0, 118, (2, 1, 8, 32, 32)))
    with torch.no_grad():
        assert torch.equal(net(image), net(image))
