"""`network_def` exports by `torch.jit.script`, saves, loads back and equals eager on a real sample CT."""

import pytest
import torch
from conftest import bundle_parser, packed_input, tiny_encoder


@pytest.fixture(scope="module")
def demo_parser():
    return bundle_parser("train.json", "demo.json")


@pytest.fixture(scope="module")
def sample_input(demo_parser, sample_datalist, sample_dir) -> torch.Tensor:
    """The first validation crop through the demo's validation chain and HU window: ``(1, 2, 12, 32, 32)``."""
    item = sample_datalist["validation"][0]
    chain = demo_parser.get_parsed_content("validate#preprocessing")
    packed = chain({"image": str(sample_dir / item["image"]), "seg": str(sample_dir / item["seg"])})["image"]
    image = demo_parser.get_parsed_content("input_window")(packed[None])
    assert image.shape == (1, 2, 12, 32, 32) and image[0, 1].max() > 0  # the crop holds labelled anatomy
    return image


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_network_def_scripts_saves_loads_and_equals_eager(demo_parser, sample_input, impl, tmp_path):
    demo_parser["attention_impl"] = impl
    demo_parser["gradient_checkpointing"] = True  # a training switch: must not stop the export
    torch.manual_seed(0)
    net = demo_parser.get_parsed_content("network_def", instantiate=True, lazy=False).eval()
    path = tmp_path / "model.ts"
    torch.jit.script(net).save(str(path))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        eager, scripted = net(sample_input), loaded(sample_input)
    assert eager.shape == (1, demo_parser["projection_dim"])
    assert (scripted - eager).abs().max() < 1e-4
    assert set(loaded.state_dict()) == set(net.state_dict())
    assert "global_head.weight" in net.state_dict() and not any(k.startswith("heads.") for k in net.state_dict())


def test_scripted_forward_features_with_every_head(region_map):
    net = tiny_encoder(region_map, segmentation_head=True, finding_head=True, pos_embed_type="sinusoidal").eval()
    scripted = torch.jit.script(net)
    image = packed_input(torch.randint(0, 118, (2, 1, 8, 16, 24)))
    with torch.no_grad():
        eager, out = net.forward_features(image), scripted.forward_features(image)
    assert set(out) == set(eager)
    for key, value in eager.items():
        assert torch.allclose(out[key].float(), value.float(), atol=1e-5), key


def test_checkpoints_with_the_old_head_keys_still_load(region_map):
    """Before the rename the projection heads were a ModuleDict: ``heads.global.weight`` etc."""
    net = tiny_encoder(region_map)
    old = {k.replace("global_head.", "heads.global.").replace("local_head.", "heads.local.").replace(
        "region_head.", "heads.region."): v.clone() + 1 for k, v in net.state_dict().items()}  # fmt: skip
    assert "heads.global.weight" in old
    net.load_state_dict(old)  # strict
    assert torch.equal(net.global_head.weight, old["heads.global.weight"])
    torch.jit.script(net)  # the load hook does not stop the export
