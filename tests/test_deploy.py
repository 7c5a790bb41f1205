"""MONAI Deploy: the application `scripts.integration.deploy_app` (DICOM series -> MonaiBundleInferenceOperator on
``model.ts`` -> embedding) gives the embedding of ``monai.bundle run`` inference with ``--seg_source none``.

Needs the Deploy install (``requirements-deploy.txt``, its own environment; README "MONAI Deploy"); skipped
without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bundle_parser, bundle_workflow, run_with_hang_guard

pytest.importorskip(
    "monai.deploy", reason="monai-deploy-app-sdk is not installed (pip install -r requirements-deploy.txt)"
)

SERIES = Path(__file__).resolve().parent / "data/dicom/upper_abdomen_series"


def test_deploy_app_embeds_the_dicom_series_as_bundle_inference_does(bundle_root, tmp_path):
    from monai.bundle import ckpt_export
    from safetensors.torch import load_file

    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    net = bundle_parser("inference.json", "demo.json").get_parsed_content("network_def")
    torch.save(net.state_dict(), models / "model.pt")
    ckpt_export(
        net_id="network_def", filepath=str(models / "model.ts"), ckpt_file=str(models / "model.pt"),
        args_file=str(bundle_root / "configs/demo_export.json"), bundle_root=str(bundle_root),
    )  # fmt: skip

    command = [sys.executable, "-m", "scripts.integration.deploy_app", "-i", str(SERIES), "-o", str(tmp_path / "app"),
               "-m", str(models / "model.ts")]  # fmt: skip
    done = run_with_hang_guard(command, bundle_root)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    deployed = np.load(tmp_path / "app/global_embedding.npy")

    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / SERIES.name).symlink_to(SERIES, target_is_directory=True)
    workflow = bundle_workflow(
        ("inference.json", "demo.json"),
        "infer",
        ckpt_dir=str(models),
        dataset_dir=str(cases),
        output_dir=str(tmp_path / "bundle"),
        seg_source="none",
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    expected = load_file(str(tmp_path / f"bundle/{SERIES.name}/embeddings.safetensors"))["global_embedding"].numpy()
    assert deployed.shape == expected.shape == (128,)
    np.testing.assert_allclose(deployed, expected, atol=1e-5)
