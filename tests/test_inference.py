"""configs/inference.json: the inference workflow on the bundled sample (NIfTI) and a real DICOM series."""

from __future__ import annotations

import json

import torch
from monai.bundle import ConfigWorkflow
from safetensors import safe_open


def _inference_workflow(bundle_root, tmp_path, **override) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=[str(bundle_root / "configs/inference.json"), str(bundle_root / "configs/demo.json")],
        meta_file=str(bundle_root / "configs/metadata.json"),
        logging_file=str(bundle_root / "configs/logging.conf"),
        workflow_type="infer",
        bundle_root=str(bundle_root),
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


def test_inference_config_has_every_required_property_and_embeds_the_sample(bundle_root, sample_dir, tmp_path):
    cases = tmp_path / "cases"
    (cases / "seg").mkdir(parents=True)
    for name in ("abdomen_00", "upper_abdomen_dicom_00"):
        (cases / f"{name}.nii.gz").write_bytes((sample_dir / f"ct/{name}.nii.gz").read_bytes())
    (cases / "seg/abdomen_00.nii.gz").write_bytes((sample_dir / "seg/abdomen_00.nii.gz").read_bytes())
    workflow = _inference_workflow(bundle_root, tmp_path, dataset_dir=str(cases))
    workflow.initialize()
    assert workflow.check_properties() == []
    net = _random_weights(workflow, tmp_path)
    workflow.run()
    workflow.finalize()
    out = tmp_path / "out"
    assert json.loads((out / "refused.json").read_text()) == []
    with safe_open(str(out / "abdomen_00/embeddings.safetensors"), framework="pt") as f:
        embedding = f.get_tensor("global_embedding")
    assert embedding.shape == (128,) and abs(float(embedding.norm()) - 1) < 1e-5
    record = json.loads((out / "abdomen_00/case.json").read_text())
    assert record["seg_source"] == "given" and record["regions_present"]
    assert json.loads((out / "upper_abdomen_dicom_00/case.json").read_text())["seg_source"] == "none"
    assert net.heads["global"].out_features == 128
