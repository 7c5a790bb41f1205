"""MONAI Label: monailabel's own `BundleInferTask` serves the bundle as a classification task (18 finding scores).

Needs the MONAI Label install (``requirements-label.txt``, its own environment; README "MONAI Label"); skipped
without it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SAMPLE_DIR, bundle_parser

pytest.importorskip("monailabel", reason="monailabel is not installed (pip install -r requirements-label.txt)")

CT, MASK = SAMPLE_DIR / "ct/abdomen_00.nii.gz", SAMPLE_DIR / "seg/abdomen_00.nii.gz"


@pytest.fixture()
def label_bundle(bundle_root, tiny_bert_dir, tmp_path):
    """The bundle as a MONAI Label app serves it, for the demo model: ``configs/inference.json`` with the demo
    override merged in (`BundleInferTask` reads that one file), weights of a demo CLIP model in ``models/model.pt``
    and its prompt embeddings beside them."""
    from scripts.integration.served_bundle import write_served_bundle

    parser = bundle_parser("train.json", "demo.json")
    parser["text_model_name"] = str(tiny_bert_dir)
    torch.manual_seed(1)
    clip = parser.get_parsed_content("clip_model").eval()
    root = write_served_bundle(tmp_path / "ct_anatomy_clip", clip, ["configs/demo.json"], bundle_root)
    return root, clip.image_encoder


def test_bundle_infer_task_scores_a_ct_with_the_trained_weights(label_bundle):
    from scripts.data import FINDINGS
    from scripts.integration.monai_label import finding_score_task
    from scripts.zero_shot import load_prompt_embeddings, sha256_file

    root, trained = label_bundle
    task = finding_score_task(str(root), {})
    assert task.is_valid() and task.type == "classification"
    assert task.labels == {name.lower(): i for i, name in enumerate(FINDINGS)}  # from configs/label_metadata.json

    # MONAI Label loads model.pt non-strictly: every key must match, or weights stay random without an error
    network = task._get_network("cpu", {})
    weights = torch.load(root / "models/model.pt", map_location="cpu")
    assert set(network.state_dict()) == set(weights)
    assert all(torch.equal(network.state_dict()[k], v) for k, v in weights.items())
    assert not all(torch.equal(task.network.state_dict()[k], v) for k, v in weights.items())  # random before load

    prompts, _ = load_prompt_embeddings(
        root / "models/prompt_embeddings.safetensors", root / "configs/zero_shot_prompts.json",
        sha256_file(root / "models/model.pt"),
    )  # fmt: skip
    preprocessing = bundle_parser("inference.json", "demo.json").get_parsed_content("preprocessing")
    for request in ({"image": str(CT)}, {"image": str(CT), "seg": str(MASK)}):  # without and with the mask
        _, result = task({**request, "device": "cpu"})
        scores = {p["label"]: p["score"] for p in result["prediction"]}
        image = preprocessing(dict(request))["image"][None]
        with torch.no_grad():
            expected = prompts.probabilities(trained(image.as_tensor()))[0]
        assert list(scores) == [name.lower() for name in FINDINGS]
        assert torch.allclose(torch.tensor(list(scores.values())), expected, atol=1e-5)
