"""configs/inference.json: the inference workflow on the bundled sample (NIfTI) and a real DICOM series."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bundle_parser, bundle_workflow
from monai.bundle import ConfigWorkflow
from safetensors import safe_open
from scripts.data import FINDINGS

DATA = Path(__file__).resolve().parent / "data"
DICOM_SERIES = DATA / "dicom/upper_abdomen_series"
DICOM_MASK = DATA / "dicom/upper_abdomen_series_seg.nii.gz"


def _inference_workflow(tmp_path, **override) -> ConfigWorkflow:
    return bundle_workflow(
        ("inference.json", "demo.json"),
        "infer",
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"),
        **override,
    )


def _random_weights(workflow: ConfigWorkflow, tmp_path) -> torch.nn.Module:
    """Save the (random) network_def of the workflow as models/model.pt."""
    net = workflow.parser.get_parsed_content("network_def")
    (tmp_path / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), tmp_path / "models/model.pt")
    return net


def test_inference_config_has_every_required_property_and_embeds_the_sample(sample_dir, tmp_path):
    cases = tmp_path / "cases"
    (cases / "seg").mkdir(parents=True)
    for name in ("abdomen_00", "upper_abdomen_dicom_00"):
        (cases / f"{name}.nii.gz").write_bytes((sample_dir / f"ct/{name}.nii.gz").read_bytes())
    (cases / "seg/abdomen_00.nii.gz").write_bytes((sample_dir / "seg/abdomen_00.nii.gz").read_bytes())
    workflow = _inference_workflow(tmp_path, dataset_dir=str(cases))
    workflow.initialize()
    assert workflow.check_properties() == []
    net = _random_weights(workflow, tmp_path)
    item = {"image": str(cases / "abdomen_00.nii.gz"), "seg": str(cases / "seg/abdomen_00.nii.gz")}
    expected = net.eval()(workflow.parser.get_parsed_content("preprocessing")(item)["image"][None])[0]
    workflow.run()
    workflow.finalize()
    out = tmp_path / "out"
    assert json.loads((out / "refused.json").read_text()) == []
    with safe_open(str(out / "abdomen_00/embeddings.safetensors"), framework="pt") as f:
        embedding = f.get_tensor("global_embedding")
    assert embedding.shape == (128,) and torch.allclose(embedding, expected, atol=1e-5)  # network_def(image)
    record = json.loads((out / "abdomen_00/case.json").read_text())
    assert record["seg_source"] == "given" and record["regions_present"]
    assert json.loads((out / "upper_abdomen_dicom_00/case.json").read_text())["seg_source"] == "none"


def _train_window_input(parser_train, item: dict) -> torch.Tensor:
    """The float32 network input training validation gives for ``item``: packed int16, then `input_window`."""
    packed = parser_train.get_parsed_content("validate#preprocessing")(dict(item))["image"]
    return parser_train.get_parsed_content("input_window")(
        packed.as_tensor() if hasattr(packed, "as_tensor") else packed
    )


@pytest.mark.parametrize("with_mask", [True, False])
def test_preprocessing_gives_the_network_input_of_training_validation_and_evaluation(sample_dir, tmp_path, with_mask):
    """NIfTI in RAS and LPS (mask in LAS) and a DICOM series: the stock-MONAI `preprocessing` of inference.json,
    the workflow's chain with the bundle's checks around it, training validation and evaluation all give
    one tensor; with only ``image`` the label channel is all zeros."""
    train = bundle_parser("train.json", "demo.json")
    evaluate = bundle_parser("train.json", "demo.json", "evaluate.json")
    infer = bundle_parser("inference.json", "demo.json")
    infer["output_dir"] = str(tmp_path / "out")
    cases = [
        {"image": str(sample_dir / "ct/abdomen_00.nii.gz"), "seg": str(sample_dir / "seg/abdomen_00.nii.gz")},
        {"image": str(sample_dir / "ct/chest_cta_00.nii.gz"), "seg": str(sample_dir / "seg/chest_cta_00.nii.gz")},
        {"image": str(DICOM_SERIES), "seg": str(DICOM_MASK)},
    ]
    for item in cases:
        if not with_mask:
            item.pop("seg")
        expected = _train_window_input(train, item)
        from_evaluation = evaluate.get_parsed_content("evaluate#preprocessing")(dict(item))["image"]
        assert torch.equal(evaluate.get_parsed_content("input_window")(torch.as_tensor(from_evaluation)), expected)
        stock = infer.get_parsed_content("preprocessing")(dict(item))
        assert set(stock) == {"image"}  # no leftover keys: MONAI Deploy passes every tensor to the network
        assert stock["image"].dtype == torch.float32 and torch.equal(stock["image"].as_tensor(), expected), item
        case = dict(item, case_id="c", input_image=item["image"], input_kind="x")
        workflow_input = infer.get_parsed_content("case_transform")(case)["image"]
        assert torch.equal(workflow_input.as_tensor(), expected)
        if not with_mask:
            assert not expected[1].any()
        else:
            assert expected[1].max() > 0
        assert expected[0].min() >= -1 and expected[0].max() <= 1 and expected[0].std() > 0.1


def _series_copy(folder: Path, names=None) -> list[Path]:
    """Copy the real series into ``folder`` (optionally under other file names); returns the new paths."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(DICOM_SERIES.iterdir())
    names = names or [p.name for p in sources]
    paths = []
    for source, name in zip(sources, names):
        (folder / name).write_bytes(source.read_bytes())
        paths.append(folder / name)
    return paths


def _edit(path: Path, target: Path | None = None, **tags) -> None:
    """Rewrite DICOM header elements of ``path`` (pixel data untouched) into ``target`` (default: in place)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.save_as(target or path)


def test_dicom_series_is_read_whatever_the_file_names_and_order(tmp_path):
    from monai.transforms import LoadImage
    from scripts.inference import check_dicom_series

    renamed = tmp_path / "renamed"
    shuffled = ["x9", "a1", "m3.dcm", "IMG0004", "b", "z_last", "0007", "c.DCM", "q", "k2", "e", "f"]
    _series_copy(renamed, shuffled)
    original, copied = (LoadImage(image_only=True)(str(p)) for p in (DICOM_SERIES, renamed))
    assert torch.equal(original, copied) and torch.equal(original.affine, copied.affine)
    info = check_dicom_series(renamed)
    assert info["n_images"] == 12 and info["slice_spacing_mm"] == 2.0 and info["convolution_kernel"] == "Br38f/3"
    assert "PatientName" not in json.dumps(info) and "DEMO0001" not in json.dumps(info)


def test_dicom_folders_with_several_series_gaps_or_tilt_are_refused_by_name(tmp_path):
    import pydicom
    from pydicom.uid import generate_uid
    from scripts.data import BadCaseError
    from scripts.inference import check_dicom_series

    uid = pydicom.dcmread(next(DICOM_SERIES.iterdir()), stop_before_pixels=True).SeriesInstanceUID
    # a second reconstruction kernel of the same scan filed in the same folder
    kernels = tmp_path / "two_kernels"
    paths = _series_copy(kernels)
    lung_uid = generate_uid()
    for path in paths[:4]:
        _edit(path, kernels / f"lung_{path.name}", SeriesInstanceUID=lung_uid, ConvolutionKernel=["Bl64f", "3"])
    with pytest.raises(BadCaseError, match=rf"2 DICOM series in one folder: .*{uid}.*12 images.*{lung_uid}.*Bl64f"):
        check_dicom_series(kernels)
    # a scout (topogram) as its own series, and the same image filed inside the axial series
    scout = tmp_path / "with_scout"
    paths = _series_copy(scout)
    _edit(paths[0], scout / "topogram.dcm", SeriesInstanceUID=generate_uid(), ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"],
          ImageOrientationPatient=[1, 0, 0, 0, 0, -1])  # fmt: skip
    with pytest.raises(BadCaseError, match=r"2 DICOM series .*LOCALIZER"):
        check_dicom_series(scout)
    (scout / "topogram.dcm").unlink()
    _edit(paths[0], scout / "topogram.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    with pytest.raises(BadCaseError, match=r"mixes 2 image geometries .* localizer"):
        check_dicom_series(scout)
    # a missing slice: one gap of 4 mm among 2 mm gaps
    missing = tmp_path / "missing"
    _series_copy(missing)[5].unlink()
    with pytest.raises(
        BadCaseError, match=r"missing: uneven slice spacing: gaps from 2.000 to 4.000 mm .*missing slice"
    ):
        check_dicom_series(missing)
    # uneven spacing: one slice 0.7 mm off its place
    uneven = tmp_path / "uneven"
    paths = _series_copy(uneven)
    position = pydicom.dcmread(paths[6], stop_before_pixels=True).ImagePositionPatient
    _edit(paths[6], ImagePositionPatient=[position[0], position[1], float(position[2]) + 0.7])
    with pytest.raises(BadCaseError, match=r"uneven slice spacing: gaps from 1.300 to 2.700 mm"):
        check_dicom_series(uneven)
    # two images at one position (a duplicate of a slice)
    duplicate = tmp_path / "duplicate"
    paths = _series_copy(duplicate)
    _edit(paths[3], duplicate / "copy_of_slice.dcm")
    with pytest.raises(BadCaseError, match=r"1 pairs of images share a slice position"):
        check_dicom_series(duplicate)
    # gantry tilt of 20 degrees: each slice shifted in y by its z offset times tan(20 deg)
    tilted = tmp_path / "tilted"
    for path in _series_copy(tilted):
        x, y, z = (float(v) for v in pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient)
        _edit(path, ImagePositionPatient=[x, y + (z + 774.5) * math.tan(math.radians(20)), z], GantryDetectorTilt=20)
    with pytest.raises(BadCaseError, match=r"tilted: gantry tilt: slices step 20.0 degrees off the slice normal"):
        check_dicom_series(tilted)
    # a folder with a single image
    single = tmp_path / "single"
    _series_copy(single, ["only.dcm"])
    with pytest.raises(BadCaseError, match=r"1 image: not a volume"):
        check_dicom_series(single)


def test_inference_run_writes_good_cases_on_their_own_grid_and_lists_refused_ones(sample_dir, tmp_path):
    """A folder as a user has it: a DICOM series with its mask, a NIfTI with its mask, a folder of two series,
    a broken file and two files sharing a case id. Good cases are written, maps on the input's own grid; the
    others are listed in refused.json with their reason, and the run goes on."""
    import nibabel as nib
    from monai.transforms import LoadImage
    from pydicom.uid import generate_uid

    cases = tmp_path / "cases"
    _series_copy(cases / "upper_abdomen_series")
    (cases / "seg").mkdir()
    (cases / "seg/upper_abdomen_series.nii.gz").write_bytes(DICOM_MASK.read_bytes())
    for name in ("abdomen_00", "chest_cta_00"):
        (cases / f"{name}.nii.gz").write_bytes((sample_dir / f"ct/{name}.nii.gz").read_bytes())
        (cases / f"seg/{name}.nii.gz").write_bytes((sample_dir / f"seg/{name}.nii.gz").read_bytes())
    (cases / "elsewhere").mkdir()
    (cases / "elsewhere/chest_cta_00.nii.gz").write_bytes((sample_dir / "ct/chest_cta_01.nii.gz").read_bytes())
    (cases / "broken.nii.gz").write_bytes(b"not a nifti file")
    second = _series_copy(cases / "two_series")
    _edit(second[0], cases / "two_series/other.dcm", SeriesInstanceUID=generate_uid())
    workflow = _inference_workflow(tmp_path, dataset_dir=str(cases))
    workflow.initialize()
    _random_weights(workflow, tmp_path)
    workflow.run()
    workflow.finalize()
    out = tmp_path / "out"
    refused = {r["case_id"] + ":" + r["image"]: r["reason"] for r in json.loads((out / "refused.json").read_text())}
    assert set(refused) == {"broken:broken.nii.gz", "chest_cta_00:chest_cta_00.nii.gz",
                            "chest_cta_00:elsewhere/chest_cta_00.nii.gz", "two_series:two_series"}  # fmt: skip
    assert "broken.nii.gz" in refused["broken:broken.nii.gz"]
    assert "shared with" in refused["chest_cta_00:chest_cta_00.nii.gz"]
    assert "2 DICOM series in one folder" in refused["two_series:two_series"]
    for case_id, source in (
        ("upper_abdomen_series", DICOM_SERIES),
        ("abdomen_00", sample_dir / "ct/abdomen_00.nii.gz"),
    ):
        ct = LoadImage(image_only=True)(str(source))
        heat = nib.load(out / case_id / "maps/cls_attention.nii.gz")
        assert heat.shape == tuple(ct.shape) and np.allclose(heat.affine, ct.affine.numpy(), atol=1e-4), case_id
        assert np.asarray(heat.dataobj).max() > 0
        assert set(json.loads((out / case_id / "scores.json").read_text())["findings"]) == set(FINDINGS)
    record = json.loads((out / "upper_abdomen_series/case.json").read_text())
    assert record["input"] == {
        "kind": "dicom", "image": "upper_abdomen_series", "seg": "seg/upper_abdomen_series.nii.gz",
        "dicom_series": record["input"]["dicom_series"],
    }  # fmt: skip
    assert record["input_grid"]["orientation"] == "LPS" and record["input_grid"]["shape"] == [512, 512, 12]
    # 500 mm across at 4 mm is larger than the demo's 32 x 32 input: the centre crop is recorded
    assert record["model_input"]["centre_crop"]["kept_voxels"] == [32, 32, 6]
    assert "liver_gallbladder" in record["regions_present"] and "DEMO0001" not in json.dumps(record)
    # safetensors files get the permissions of the other outputs (safetensors alone writes 0600)
    mode = {p.name: p.stat().st_mode & 0o777 for p in (out / "abdomen_00").iterdir() if p.is_file()}
    assert mode["embeddings.safetensors"] == mode["case.json"]


def test_a_run_whose_every_case_is_refused_fails_after_listing_them(tmp_path):
    """Nothing written is not a success: the run lists the refused case, then raises (non-zero exit)."""
    from scripts.errors import cause_line

    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "empty.nii.gz").write_bytes(b"")
    workflow = _inference_workflow(tmp_path, dataset_dir=str(cases))
    workflow.initialize()
    _random_weights(workflow, tmp_path)
    with pytest.raises(RuntimeError) as info:  # MONAI's wrapper around the bundle's error
        workflow.run()
    assert cause_line(info.value).startswith("ERROR (cause): BadCaseError: every case was refused (1 of 1)")
    refused = json.loads((tmp_path / "out/refused.json").read_text())
    assert [r["image"] for r in refused] == ["empty.nii.gz"] and "empty.nii.gz" in refused[0]["reason"]


def test_a_failed_run_ends_with_one_line_naming_the_cause(bundle_root, tmp_path):
    """The README's inference command on a folder that does not exist: MONAI's wrappers stay in the traceback,
    and the last line names the bundle's own error."""
    import subprocess
    import sys

    (tmp_path / "models").mkdir()
    torch.save({}, tmp_path / "models/model.pt")
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "['configs/inference.json','configs/demo.json']",
        "--dataset_dir", str(tmp_path / "no_such_folder"), "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True)
    assert done.returncode != 0
    assert "Failed to evaluate" in done.stderr  # MONAI's wrapper is still shown
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"ERROR (cause): FileNotFoundError: dataset_dir {tmp_path / 'no_such_folder'} does not exist"


def test_cause_line_prefers_the_bundles_own_exception():
    from scripts.data import BadCaseError
    from scripts.errors import cause_line
    from scripts.inference import check_dicom_series

    try:
        try:
            try:
                check_dicom_series(DATA)  # a folder without DICOM files: the bundle's BadCaseError
            except BadCaseError as err:
                raise RuntimeError("applying transform <CheckDicomSeriesd>") from err
        except RuntimeError as err:
            raise RuntimeError("Failed to evaluate ConfigExpression") from err
    except RuntimeError as err:
        assert cause_line(err) == f"ERROR (cause): BadCaseError: {DATA}: no DICOM files"
    try:
        try:
            int("x")
        except ValueError as err:
            raise RuntimeError("wrapper") from err
    except RuntimeError as err:  # no bundle frame: the innermost exception
        assert cause_line(err).startswith("ERROR (cause): ValueError: invalid literal for int()")
    # a heading and a list of problems: the heading, the first problem and how many lines are left out
    try:
        raise ValueError(
            "datalist.json [training]: 3 problem(s):\n  item 1: missing ['text']\n  item 2: x\n  item 3: y"
        )
    except ValueError as err:
        assert cause_line(err) == (
            "ERROR (cause): ValueError: datalist.json [training]: 3 problem(s): item 1: missing ['text'] "
            "(+2 more lines above)"
        )


def test_seg_source_totalsegmentator_says_how_to_install_it(monkeypatch):
    import sys

    from scripts.inference import check_seg_source

    monkeypatch.setitem(sys.modules, "totalsegmentator", None)  # as if not installed
    with pytest.raises(
        RuntimeError, match=r"not installed .*pip install 'TotalSegmentator.*totalseg_download_weights -t total"
    ):
        check_seg_source("totalsegmentator")
    with pytest.raises(ValueError, match="seg_source must be one of"):
        check_seg_source("nnunet")
    assert check_seg_source("none") == "none"


def test_seg_source_totalsegmentator_segments_a_series_without_mask(tmp_path, monkeypatch):
    """TotalSegmentator's Python API (replaced here by a stand-in that returns the series' real mask) gets the CT
    as the bundle read it; its mask is saved with the case, checked against the CT grid and used."""
    import sys
    import types

    import nibabel as nib
    from scripts.data.label_maps import read_label_table

    weights = tmp_path / "totalseg_weights"
    (weights / "Dataset291_TotalSegmentator_part1_organs_1559subj").mkdir(parents=True)
    calls = []

    def totalsegmentator(image, output=None, ml=False, task="total", quiet=False, device="gpu"):
        calls.append((image.shape, output, ml, task))
        return nib.load(DICOM_MASK)  # a real TotalSegmentator 2.x mask: its label table in the header

    package = types.ModuleType("totalsegmentator")
    package.python_api = types.SimpleNamespace(totalsegmentator=totalsegmentator)
    package.config = types.SimpleNamespace(get_weights_dir=lambda: str(weights))
    for name, module in (("", package), (".python_api", package.python_api), (".config", package.config)):
        monkeypatch.setitem(sys.modules, f"totalsegmentator{name}", module)
    cases = tmp_path / "cases"
    _series_copy(cases / "series_without_mask")
    workflow = _inference_workflow(tmp_path, dataset_dir=str(cases), seg_source="totalsegmentator")
    workflow.initialize()
    _random_weights(workflow, tmp_path)
    workflow.run()
    workflow.finalize()
    assert calls == [((512, 512, 12), None, True, "total")]
    record = json.loads((tmp_path / "out/series_without_mask/case.json").read_text())
    assert record["seg_source"] == "totalsegmentator" and "liver_gallbladder" in record["regions_present"]
    saved = tmp_path / "out/series_without_mask/totalsegmentator_total.nii.gz"
    table = read_label_table(str(saved))  # kept, so the label check can verify the ids
    assert table is not None and table == read_label_table(str(DICOM_MASK))
    assert nib.load(saved).get_data_dtype() == np.uint8


def test_datalist_input_with_its_own_case_ids(sample_dir, tmp_path):
    from scripts.inference import find_cases

    (tmp_path / "list").mkdir()
    datalist = tmp_path / "list/cases.json"
    datalist.write_text(json.dumps({"testing": [
        {"image": str(sample_dir / "ct/abdomen_00.nii.gz"), "seg": str(sample_dir / "seg/abdomen_00.nii.gz"), "case_id": "p1"},
        {"image": str(DICOM_SERIES)},
        {"image": "missing.nii.gz"},
    ]}))  # fmt: skip
    cases = find_cases(tmp_path, None, datalist)
    assert [c["case_id"] for c in cases] == ["missing", "p1", "upper_abdomen_series"]
    assert cases[0]["refusal"].endswith("list/missing.nii.gz does not exist")  # relative to the datalist
    assert cases[1]["seg"].endswith("seg/abdomen_00.nii.gz") and cases[2]["input_kind"] == "dicom"
    assert "seg" not in cases[2]


def test_inference_network_def_matches_metadata(bundle_root):
    """What the Model Zoo's CI checks on inference.json: network_def's input and output against metadata.json,
    and the metadata's own channel definitions (one value range per input channel)."""
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def", meta_file=str(bundle_root / "configs/metadata.json"),
        config_file=str(bundle_root / "configs/inference.json"), device="cpu", n=1, bundle_root=str(bundle_root),
    )  # fmt: skip
    image = json.loads((bundle_root / "configs/metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    ranges = [image["channel_def"][c]["value_range"] for c in ("0", "1")]
    assert ranges == [[-1, 1], [0, 117]] and image["num_channels"] == 2


def test_a_model_with_a_local_head_writes_a_map_per_finding_above_its_threshold(bundle_root, sample_dir, tmp_path):
    """ablation.json's heads (local, region, ...): prompt embeddings and thresholds for these weights give the
    scores; the one finding above its threshold gets its finding-to-patch map on the CT's grid; local and
    region embeddings are saved."""
    import nibabel as nib
    from scripts.zero_shot import save_prompt_embeddings, sha256_file

    cases = tmp_path / "cases"
    (cases / "seg").mkdir(parents=True)
    (cases / "chest_cta_00.nii.gz").write_bytes((sample_dir / "ct/chest_cta_00.nii.gz").read_bytes())
    (cases / "seg/chest_cta_00.nii.gz").write_bytes((sample_dir / "seg/chest_cta_00.nii.gz").read_bytes())
    workflow = bundle_workflow(
        ("inference.json", "demo.json", "ablation.json"), "infer", ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "out"), dataset_dir=str(cases), save_local=True,
    )  # fmt: skip
    workflow.initialize()
    _random_weights(workflow, tmp_path)
    model_file = tmp_path / "models/model.pt"

    class StubCLIP(torch.nn.Module):  # a text tower stand-in: fixed random prompt embeddings
        def text_encoder(self, texts):
            return torch.nn.functional.normalize(
                torch.randn(len(texts), 128, generator=torch.Generator().manual_seed(0)), dim=-1
            )

        def logit_scale(self):
            return torch.tensor(50.0)

    prompt_file = bundle_root / "configs/zero_shot_prompts.json"
    templates = json.loads(prompt_file.read_text())["templates"]
    save_prompt_embeddings(StubCLIP(), templates, prompt_file, model_file)
    thresholds = {
        f: {"threshold": None, "rule": ">", "reason": "only negative cases", "n": 3, "n_positive": 0} for f in FINDINGS
    }
    thresholds["Emphysema"] = {"threshold": 0.0, "rule": ">", "n": 3, "n_positive": 1}
    (tmp_path / "models/thresholds.json").write_text(json.dumps({
        "model_sha256": sha256_file(model_file), "threshold_method": "ct_clip", "eval_section": "validation",
        "cases": 3, "findings": thresholds,
    }))  # fmt: skip
    workflow.run()
    workflow.finalize()
    case = tmp_path / "out/chest_cta_00"
    scores = json.loads((case / "scores.json").read_text())["findings"]
    assert [f for f, s in scores.items() if s["above_threshold"]] == ["Emphysema"]
    assert scores["Atelectasis"]["threshold"] is None  # the evaluation could not choose one; the reason says where
    assert scores["Atelectasis"]["reason"] == (
        f"{tmp_path / 'models/thresholds.json'} (ct_clip rule on 3 validation cases): only negative cases"
    )
    assert sorted(p.name for p in (case / "maps").iterdir()) == ["Emphysema.nii.gz"]
    ct = nib.load(sample_dir / "ct/chest_cta_00.nii.gz")
    emphysema = nib.load(case / "maps/Emphysema.nii.gz")
    assert emphysema.shape == ct.shape and np.allclose(emphysema.affine, ct.affine, atol=1e-4)
    values = np.asarray(emphysema.dataobj)
    assert values.min() >= -1 - 1e-5 and values.max() <= 1 + 1e-5 and np.abs(values).max() > 0  # cosine similarities
    with safe_open(str(case / "embeddings.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_tensor(k).shape) for k in f.keys()}
    assert shapes == {"global_embedding": (128,), "region_embedding": (20, 128), "region_present": (20,),
                      "local_embedding": (48, 128)}  # fmt: skip
