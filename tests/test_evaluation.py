"""The evaluation workflow end to end: sample data, CT-RATE layout, maps on the CT, DDP equals one process."""

from __future__ import annotations

import csv
import json
import math
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import bundle_parser, bundle_workflow, run_with_hang_guard
from monai.transforms import Compose
from scripts.data import FINDINGS
from scripts.evaluation import load_prompt_templates, network_grid_affine, save_map_on_ct

CONFIGS = ("train.json", "demo.json", "ablation.json", "evaluate.json")
LIVER = 5


def _evaluate(tmp_path, checkpoint, **override) -> dict:
    workflow = bundle_workflow(
        CONFIGS,
        "infer",
        eval_checkpoint=str(checkpoint),
        eval_dir=str(tmp_path / "eval"),
        log_dir=str(tmp_path / "logs"),
        cache_dir=str(tmp_path / "cache"),
        n_bootstrap=20,
        **override,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return json.loads((tmp_path / "eval/metrics.json").read_text())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An (untrained) demo-size CLIP model with region, local, segmentation and finding heads, saved
    the way training saves ``model_clip.pt``."""
    parser = bundle_parser(*CONFIGS)
    torch.manual_seed(0)
    model = parser.get_parsed_content("clip_model")
    path = tmp_path_factory.mktemp("ckpt") / "model_clip.pt"
    torch.save({"model": model.state_dict()}, path)
    return path


def test_evaluation_on_the_sample_writes_every_metric(tmp_path, checkpoint, sample_dir):
    report = _evaluate(tmp_path, checkpoint)
    assert report["cases"] == 20 and report["cases_not_evaluated"] == []
    for direction in ("image_to_text", "text_to_image"):
        entry = report["retrieval"][direction]
        assert {f"recall@{k}" for k in (1, 5, 10, 50, 100)} | {"mean_rank", "median_rank"} <= set(entry)
        assert entry["recall@1"]["value"] is not None
        assert entry["recall@50"] == {"value": None, "reason": "K=50 >= 20 candidates per pool: every query is a hit"}
    # the sample has no finding labels: every classification number is null with its reason
    for section in ("zero_shot", "finding_head"):
        assert report[section]["per_class"]["Cardiomegaly"]["auroc"] == {"value": None, "reason": "no labels"}
        assert set(report[section]["macro"]) == {"ct_clip_18", "fvlm_16"}
    assert set(report["grounding"]["top_regions_per_finding"]) == set(FINDINGS)
    assert report["grounding"]["report_region_auroc"]["pooled"]["value"] is not None
    cot = report["chain_of_thought"]
    assert cot["step_region_accuracy"]["n_steps"] > 0 and 0 <= cot["step_region_accuracy"]["value"] <= 1
    assert 0 <= cot["step_order_consistency"]["value"] <= 1
    rows = list(csv.DictReader(open(tmp_path / "eval/per_case.csv")))
    assert len(rows) == 20 and all(1 <= float(r["image_to_text_rank"]) <= 20 for r in rows)
    for name in ("recall_at_k", "roc_zero_shot", "slice_bias_first_block", "slice_bias_last_block"):
        assert (tmp_path / f"eval/figures/{name}.png").stat().st_size > 1000
    # maps of the first two cases lie on the original CT's grid, also when read back from the cache
    item = json.loads((sample_dir / "datalist.json").read_text())["validation"][0]
    ct = nib.load(sample_dir / item["image"])
    first = {}
    for kind in ("text_to_patch", "cls_attention"):
        saved = nib.load(tmp_path / f"eval/maps/{item['study']}_{kind}.nii.gz")
        assert saved.shape == ct.shape and np.allclose(saved.affine, ct.affine)
        first[kind] = np.asanyarray(saved.dataobj)
        assert np.isfinite(first[kind]).all() and np.abs(first[kind]).max() > 0
    _evaluate(tmp_path, checkpoint)  # second run: every case from the cache
    for kind, values in first.items():
        assert np.allclose(
            np.asanyarray(nib.load(tmp_path / f"eval/maps/{item['study']}_{kind}.nii.gz").dataobj), values
        )


def test_evaluation_on_the_ct_rate_layout_defines_what_the_labels_allow(tmp_path, checkpoint, ctrate_root):
    report = _evaluate(
        tmp_path, checkpoint, dataset_dir=str(ctrate_root / "dataset"), seg_dir=str(ctrate_root / "seg"),
        missing_seg="no_regions", eval_section="training", hu_air_check=True, num_maps=0,
    )  # fmt: skip
    per_class = report["zero_shot"]["per_class"]
    assert report["cases"] == 3
    assert report["cases_not_evaluated"] == []
    assert per_class["Hiatal hernia"]["auroc"] == {"value": None, "reason": "only negative cases"}
    assert per_class["Cardiomegaly"]["auroc"]["value"] is not None  # labels written for the test: 0, 1, 0
    # Hiatal hernia has no positive: CT-CLIP's mean over every finding is undefined, ours over the defined ones is not
    headline = report["zero_shot"]["macro"]["fvlm_16"]["auroc"]
    assert headline["value"] is None and headline["findings_undefined"]["Hiatal hernia"] == "only negative cases"
    assert report["zero_shot"]["macro_over_defined"]["fvlm_16"]["auroc"]["value"] is not None
    assert report["zero_shot"]["macro"]["fvlm_16"]["accuracy"]["value"] is not None
    # two reconstructions of one scan are one study: retrieval keeps one volume per scan
    assert report["retrieval"]["protocol"]["pairs_evaluated"] == 2
    assert report["chain_of_thought"] == {"value": None, "reason": "no chain-of-thought steps in the evaluation data"}


def test_non_finite_numbers_are_written_as_null_and_named():
    from scripts.evaluation import replace_non_finite

    report = {"a": {"threshold": {"value": math.inf}, "ok": 0.5}, "b": [1.0, math.nan], "c": "text"}
    clean, found = replace_non_finite(report)
    assert clean == {"a": {"threshold": {"value": None}, "ok": 0.5}, "b": [1.0, None], "c": "text"}
    assert found == ["a/threshold/value: inf", "b/1: nan"]
    json.dumps(clean, allow_nan=False)


def test_map_peak_lands_in_the_named_region_on_the_ct_grid(sample_datalist, sample_dir, tmp_path):
    """A map that peaks at the patch with the most liver comes back onto the CT file inside its liver."""
    parser = bundle_parser(*CONFIGS)
    item = max(
        sample_datalist["validation"],
        key=lambda it: (np.asanyarray(nib.load(sample_dir / it["seg"]).dataobj) == LIVER).sum(),
    )
    files = {"image": str(sample_dir / item["image"]), "seg": str(sample_dir / item["seg"])}
    chain = Compose(parser.get_parsed_content("evaluate#preprocessing"))
    data = chain(dict(files, text=item["text"], labels=[float("nan")] * 18))
    encoder = parser.get_parsed_content("network_def")
    assignment = encoder.anatomy.assign(data["image"][None, 1:])
    liver_region = parser.get_parsed_content("region_map").names.index("liver_gallbladder")
    patch_size = encoder.patch_embed.patch_size
    grid = tuple(s // p for s, p in zip(parser["input_size"], patch_size))
    patch_map = assignment["patch_to_region"][0, :, liver_region].reshape(grid)  # (Z, Y, X), peak in the liver
    path = save_map_on_ct(
        patch_map,
        data["grid_affine"],
        data["grid_shape"],
        parser["input_size"],
        data["image"][0],
        files["image"],
        tmp_path / "liver",
    )
    saved, ct, seg = nib.load(path), nib.load(files["image"]), nib.load(files["seg"])
    assert saved.shape == ct.shape and np.allclose(saved.affine, ct.affine)
    values = np.asanyarray(saved.dataobj)
    peak = np.unravel_index(np.argmax(values), values.shape)
    assert np.asanyarray(seg.dataobj)[peak] == LIVER
    assert (tmp_path / "liver.png").is_file()
    # the padding offset: network voxel i is crop voxel i - (target - size) // 2
    affine = network_grid_affine(torch.eye(4, dtype=torch.float64), [30, 31, 12], (12, 32, 32))
    assert affine[:3, 3].tolist() == [-1.0, 0.0, 0.0]


def test_prompt_templates_file(bundle_root, tmp_path):
    assert load_prompt_templates(bundle_root / "configs/zero_shot_prompts.json") == [
        ("{finding} is present.", "{finding} is not present.")
    ]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"templates": [["{finding} is present.", "absent"]]}))
    with pytest.raises(ValueError, match="bad.json"):
        load_prompt_templates(bad)


def test_two_process_evaluation_equals_one_process(bundle_root, tmp_path, checkpoint):
    """torchrun with two CPU processes (gloo, uneven batches): the same metrics as one process (this one)."""
    one = _evaluate(tmp_path, checkpoint, num_maps=0, batch_size=3)
    configs = [str(bundle_root / "configs" / c) for c in CONFIGS + ("multi_gpu_evaluate.json",)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "monai.bundle", "run",
               "--config_file", str(configs), "--eval_checkpoint", str(checkpoint), "--cache_dir", str(tmp_path / "cache"),
               "--log_dir", str(tmp_path / "logs"), "--n_bootstrap", "20", "--num_maps", "0", "--batch_size", "3",
               "--eval_dir", str(tmp_path / "two")]  # fmt: skip
    done = run_with_hang_guard(command, bundle_root)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    two = json.loads((tmp_path / "two/metrics.json").read_text())
    assert two["cases"] == one["cases"] == 20
    for section in ("retrieval", "zero_shot", "grounding", "chain_of_thought"):
        assert _same(one[section], two[section]), section


def _same(a, b, tol: float = 1e-5) -> bool:
    """Equal JSON reports up to float round-off (batches differ between the runs)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k], tol) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= tol * max(1.0, abs(a))
    return a == b


def test_a_case_refused_while_loading_is_listed_not_silently_dropped(tmp_path, checkpoint, sample_dir):
    validation = json.loads((sample_dir / "datalist.json").read_text())["validation"][:4]
    items = [dict(it, image=str(sample_dir / it["image"]), seg=str(sample_dir / it["seg"])) for it in validation]
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes((sample_dir / validation[1]["image"]).read_bytes()[:2000])
    items[1] = dict(items[1], image=str(corrupt), case_id="broken")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "datalist.json").write_text(json.dumps({"validation": items}))
    report = _evaluate(
        tmp_path, checkpoint, dataset_dir=str(data_dir), num_maps=0, max_bad_fraction=0.25
    )  # 1 of 4 refused: within 0.25 (the default 0.1 stops; no floor)
    assert report["cases"] == 3
    assert [(c["case_index"], c["case_id"]) for c in report["cases_not_evaluated"]] == [(1, "broken")]
