"""TorchScript export as the Model Zoo's CI does it (`monai.bundle ckpt_export`, scripting) and the demo's metadata
override: ``configs/demo_export.json`` carries the demo's 128-d output in place of metadata.json's 512."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import bundle_parser
from monai.bundle import ckpt_export, verify_net_in_out
from monai.data import load_net_with_metadata


@pytest.fixture(scope="module")
def demo_weights(tmp_path_factory):
    """Seeded random weights of the demo network (inference.json + demo.json) as ``model.pt``."""
    parser = bundle_parser("inference.json", "demo.json")
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def").eval()
    path = tmp_path_factory.mktemp("export") / "model.pt"
    torch.save(net.state_dict(), path)
    return parser, net, path


def test_demo_export_args_carry_the_demo_output_size(bundle_root, monkeypatch):
    monkeypatch.chdir(bundle_root)  # the args file names the configs from the bundle root, as the README runs it
    args = str(bundle_root / "configs/demo_export.json")
    verify_net_in_out(net_id="network_def", args_file=args, device="cpu", n=1, bundle_root=str(bundle_root))
    with pytest.raises(ValueError, match="output channel number `128` doesn't match: `512`"):
        verify_net_in_out(
            net_id="network_def", args_file=args, device="cpu", n=1, bundle_root=str(bundle_root),
            **{"_meta_#network_data_format#outputs#pred#num_channels": 512},
        )  # fmt: skip


def test_ckpt_export_scripts_with_embedded_configs_and_equals_eager(
    bundle_root, sample_dir, demo_weights, tmp_path, monkeypatch
):
    parser, net, weights = demo_weights
    monkeypatch.chdir(bundle_root)
    ckpt_export(
        net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(weights),
        args_file=str(bundle_root / "configs/demo_export.json"), bundle_root=str(bundle_root),
    )  # fmt: skip
    names = ["inference.json", "demo.json"]
    loaded, meta, extra = load_net_with_metadata(str(tmp_path / "model.ts"), more_extra_files=names)
    assert hasattr(loaded, "forward_features")  # scripted (ckpt_export's default): a trace keeps forward only
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 128
    for name in names:  # the configs travel as written, for MONAI Deploy
        assert json.loads(extra[name]) == json.loads((bundle_root / "configs" / name).read_text())
    # a real CT crop and its mask through inference.json's own preprocessing
    item = {"image": str(sample_dir / "ct/abdomen_00.nii.gz"), "seg": str(sample_dir / "seg/abdomen_00.nii.gz")}
    image = parser.get_parsed_content("preprocessing")(item)["image"][None]  # (1, 2, 12, 32, 32)
    assert image.shape == (1, 2, 12, 32, 32) and image[0, 1].max() > 0
    with torch.no_grad():
        eager, scripted = net(image.as_tensor()), loaded(image.as_tensor())
    assert scripted.shape == (1, 128) and (scripted - eager).abs().max() < 1e-4


def test_served_bundle_merges_the_overrides_and_holds_the_models_weights(bundle_root, tiny_bert_dir, tmp_path):
    """What MONAI Label serves for a model trained with an override: one inference.json that builds the model's
    network (the demo's 128-d output), model.pt loading into it strictly, prompt embeddings of the same weights;
    an existing folder is never overwritten."""
    from monai.bundle import ConfigParser
    from scripts.integration.served_bundle import write_served_bundle
    from scripts.zero_shot import load_prompt_embeddings, sha256_file

    parser = bundle_parser("train.json", "demo.json")
    parser["text_model_name"] = str(tiny_bert_dir)
    clip = parser.get_parsed_content("clip_model").eval()
    root = write_served_bundle(tmp_path / "served", clip, ["configs/demo.json"], bundle_root)
    served = ConfigParser()
    served.read_config(str(root / "configs/inference.json"))
    served["bundle_root"] = str(root)
    network = served.get_parsed_content("network_def")
    network.load_state_dict(torch.load(root / "models/model.pt", weights_only=True), strict=True)
    assert network.global_head.out_features == 128 and torch.equal(
        network.global_head.weight, clip.image_encoder.global_head.weight
    )
    prompts, reason = load_prompt_embeddings(
        root / "models/prompt_embeddings.safetensors",
        root / "configs/zero_shot_prompts.json",
        sha256_file(root / "models/model.pt"),
    )
    assert reason is None and prompts.prompt_embedding.shape[-1] == 128
    mode = {p.name: p.stat().st_mode & 0o777 for p in (root / "models").iterdir()}
    assert mode["prompt_embeddings.safetensors"] == mode["model.pt"]  # not safetensors' own 0600
    with pytest.raises(FileExistsError, match="never overwrites"):
        write_served_bundle(root, clip, ["configs/demo.json"], bundle_root)
