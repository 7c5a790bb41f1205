"""The benchmark code (`python -m scripts.benchmarks.encoder`), its GPU path run on the CPU at tiny sizes.

These check that the measurements run and count what they claim; they time nothing.
"""

import pytest
import torch
from conftest import BUNDLE_ROOT, bundle_parser
from scripts.benchmarks import encoder, report, throughput
from torch import nn

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 4, "patch_size": (4, 8, 8), "projection_dim": 16}
TINY_TEXT = {"vocab_size": 100, "width": 32, "depth": 1, "heads": 2, "max_length": 16}


def test_token_grids():
    assert encoder.grid_for_tokens(4096) == (16, 16, 16)
    assert encoder.grid_for_tokens(2048) == (16, 8, 16)
    assert encoder.input_for_tokens(16384) == (64, 512, 512)  # the seed input
    with pytest.raises(ValueError, match="multiple of 16"):
        encoder.grid_for_tokens(1000)
    assert encoder.variants_for(16384, ["fused", "reference"]) == ["anatomy_fused", "plain", "monai_vit"]


def test_model_flops_counts_a_linear_layer_exactly():
    flops = throughput.model_flops(lambda: nn.Linear(30, 20), lambda: (torch.empty(7, 30),))
    assert flops == 2 * 7 * 30 * 20


def test_seed_flops_match_the_arithmetic():
    """The seed forward's matmul FLOPs by hand: 12 blocks of qkv/proj/MLP/cross-attention linears,
    attention over 16,385 tokens, region cross-attention, patch embedding (counted on the meta device)."""
    flops = throughput.model_flops(
        lambda: throughput.build_encoder(attention_impl="reference"), lambda: (torch.empty(1, 2, 64, 512, 512),)
    )
    n, t, c, r = 16384, 16385, 768, 20
    per_block = 2 * (t * c * 3 * c + t * c * c + 2 * t * c * 4 * c)  # qkv, proj, MLP
    per_block += 2 * 2 * t * t * c  # q k^T and attention x v
    per_block += 2 * (n * c * c + r * c * 2 * c + n * c * c) + 2 * 2 * n * r * c  # cross: q, kv, proj, attention
    per_block += 2 * n * r * c  # region tokens of the block's input
    expected = 12 * per_block + 2 * n * c * 4 * 16 * 16 + 2 * n * r * c + 2 * c * 512  # + embed, region features, head
    assert abs(flops - expected) / expected < 1e-3, (flops, expected)
    assert 1.3e13 < flops < 1.33e13  # the 1.3e13 of issue 11


def test_benchmark_encoder_is_train_json_network_def():
    parser = bundle_parser("train.json")
    parser["attention_impl"] = "fused"
    with torch.device("meta"):
        configured = parser.get_parsed_content("network_def")
        built = throughput.build_encoder(attention_impl="fused")
    assert {k: v.shape for k, v in configured.state_dict().items()} == {
        k: v.shape for k, v in built.state_dict().items()
    }
    assert configured.blocks[0].attn.attention_impl == built.blocks[0].attn.attention_impl == "fused"


def test_forward_figures_on_cpu_at_tiny_size():
    figures = throughput.forward_figures(
        "fused", torch.device("cpu"), (1, 2), (8, 32, 32), torch.bfloat16, repeats=1, peak_tflops=1.0, **TINY
    )
    assert set(figures["batches"]) == {"1", "2"} and figures["model_gflops_per_volume"] > 0
    for entry in figures["batches"].values():
        assert entry["latency_ms"] > 0 and entry["volumes_per_s"] > 0 and entry["peak_memory_gb"] is None
        assert 0 < entry["model_flops_utilisation"]


@pytest.mark.parametrize("prefer_transformers", [False, True])
def test_training_step_on_cpu_at_tiny_size(prefer_transformers):
    figures = throughput.training_step_figures(
        torch.device("cpu"),
        batch=2,
        input_size=(8, 32, 32),
        text_length=16,
        dtype=torch.bfloat16,
        repeats=1,
        peak_tflops=1.0,
        text_size=TINY_TEXT,
        prefer_transformers=prefer_transformers,
        **TINY,
    )
    assert figures["text_tower"] == ("BertTextTower" if prefer_transformers else "TextTowerStandIn")
    assert figures["volumes_per_s"] > 0
    assert figures["model_tflops_per_step"] >= 0 and figures["model_flops_utilisation"] > 0


def test_text_tower_stand_in_has_bert_base_size():
    """The plain-torch stand-in has BERT-base's parameter count (transformers' `BertModel` without pooler)."""
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        stand_in = throughput.text_tower(512, False, prefer_transformers=False)
        bert = BertModel(BertConfig(), add_pooling_layer=False)
    count = sum(p.numel() for p in stand_in.parameters()) - 768 * 512  # without the projection
    assert count == sum(p.numel() for p in bert.parameters()) - 2 * 768  # BERT has token-type embeddings


def test_memory_child_runs_in_process():
    spec = {"variant": "anatomy_fused", "input_size": [64, 16, 16], "depth": 1, "batch": 1, "dtype": "float32"}
    result = encoder.child_main(spec)
    assert result["output_finite"] and result["peak_rss_mb"] >= result["rss_before_mb"] > 0


def test_report_states_targets_met_and_not_met():
    row = {
        "tokens": 2048,
        "input_size": [64, 128, 256],
        "seconds": {"anatomy_fused": 1.4, "plain": 1.0, "monai_vit": 0.5},
        "memory_growth_mb": {"anatomy_fused": 130, "plain": 100, "monai_vit": 100},
        "memory_growth_mb_fixed_mmap_threshold": {"anatomy_fused": 110, "plain": 100, "monai_vit": 100},
    }
    section = {"command": "c", "date": "d", "machine": {"cpu": "x", "torch_threads": 2, "torch": "t"}}
    text = report.markdown({"cpu_tokens": {**section, "depth": 2, "batch": 1, "dtype": "float32", "repeats": 1,
                                           "rows": [row]}})  # fmt: skip
    line = next(s for s in text.splitlines() if s.startswith("| anatomy vs plain encoder, CPU, 2,048"))
    assert "1.40x time" in line and "1.30x (glibc default)" in line and "met / **not met**, met" in line
    vit = next(s for s in text.splitlines() if s.startswith("| anatomy encoder vs MONAI ViT (SDPA), CPU, 2,048"))
    assert "2.80x" in vit and "**not met**" in vit
    assert report.GPU_COMMAND in text and "unmeasured" in text.lower()
    assert (BUNDLE_ROOT / "scripts/benchmarks/encoder.py").exists()
