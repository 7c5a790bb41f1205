"""The fused slice-attention path (bias folded into extra q/k channels) against the explicit-bias reference.

Outputs and gradients (input, projections, the slice-bias table) at several token counts, with and
without the CLS token, slice rows of unequal length, distances beyond the bias table, in float64,
float32 and bfloat16; and the whole encoder on both paths.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import packed_input, tiny_encoder
from scripts.networks import SliceAwareSelfAttention
from scripts.networks.patch_embedding import patch_grid_positions
from scripts.networks.slice_attention import fold_bias_into_channels

# (dtype, atol, rtol) of fused vs reference; bf16 compares both paths to the float32 reference
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-4), torch.bfloat16: (4e-2, 4e-2)}


def _slice_rows(grid: tuple[int, int, int], cls: bool) -> torch.Tensor:
    rows = patch_grid_positions(grid)[:, 0]  # (N,)
    return F.pad(rows, (1, 0), value=-1) if cls else rows


def _pair(module_cls, *args, **kwargs):
    """The same module twice, ``"reference"`` and ``"fused"``, with equal random weights."""
    torch.manual_seed(0)
    reference = module_cls(*args, attention_impl="reference", **kwargs)
    fused = module_cls(*args, attention_impl="fused", **kwargs)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.3)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def _outputs_and_grads(module, inputs: list[torch.Tensor], call, dtype: torch.dtype):
    module = module.to(torch.float32 if dtype == torch.bfloat16 else dtype)
    leaves = [t.detach().to(dtype if dtype != torch.bfloat16 else torch.float32).requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = call(module, *leaves)
    out = out.to(leaves[0].dtype)
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(_mix(out), leaves + list(params))
    names = [f"input {i}" for i in range(len(leaves))] + list(names)
    return out.float(), dict(zip(names, [g.float() for g in grads]))


def _mix(t: torch.Tensor) -> torch.Tensor:
    """A scalar that depends on every element of ``t`` with a different weight."""
    return (t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum()


def _assert_close(fused, reference, dtype, what: str):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, reference.abs().max().item())
    assert torch.allclose(
        fused, reference, atol=atol * scale, rtol=rtol
    ), f"{what}: max |fused - reference| = {(fused - reference).abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [True, False])
@pytest.mark.parametrize("grid", [(1, 2, 3), (3, 2, 2), (5, 3, 4), (12, 2, 3)])
def test_fused_slice_attention_equals_reference(grid, cls, dtype):
    # 4 buckets: distances >= 3 rows share the last entry (grid 12 exercises the saturation)
    reference, fused = _pair(SliceAwareSelfAttention, 24, 3, num_slice_buckets=4)
    slices = _slice_rows(grid, cls)
    x = torch.randn(2, slices.numel(), 24, generator=torch.Generator().manual_seed(1))

    def call(module, x):
        return module(x, slices, grid[0])

    if dtype == torch.bfloat16:  # both bf16 paths against the float32 reference
        truth, truth_grads = _outputs_and_grads(reference, [x], call, torch.float32)
        for module in (reference, fused):
            out, grads = _outputs_and_grads(module, [x], call, dtype)
            _assert_close(out, truth, dtype, "output")
            for name in truth_grads:
                _assert_close(grads[name], truth_grads[name], dtype, f"grad {name}")
        return
    out_r, grads_r = _outputs_and_grads(reference, [x], call, dtype)
    out_f, grads_f = _outputs_and_grads(fused, [x], call, dtype)
    _assert_close(out_f, out_r, dtype, "output")
    for name in grads_r:
        _assert_close(grads_f[name], grads_r[name], dtype, f"grad {name}")
    assert grads_r["slice_bias"].abs().sum() > 0  # the bias table really gets a gradient


def test_fused_slice_attention_with_unequal_rows_in_any_order():
    """Token rows need not fill a grid: an uneven last row, tokens out of order, a CLS token in the middle."""
    reference, fused = _pair(SliceAwareSelfAttention, 16, 2, num_slice_buckets=32)
    slices = torch.tensor([0, 0, 0, 1, 1, 1, 2, -1, 3, 3, 3, 4, 1, 0])  # row 4 has one token, CLS at 7
    slices = slices[torch.randperm(slices.numel(), generator=torch.Generator().manual_seed(0))]
    x = torch.randn(3, slices.numel(), 16, dtype=torch.float64)
    out_r, grads_r = _outputs_and_grads(reference, [x], lambda m, x: m(x, slices, 5), torch.float64)
    out_f, grads_f = _outputs_and_grads(fused, [x], lambda m, x: m(x, slices, 5), torch.float64)
    _assert_close(out_f, out_r, torch.float64, "output")
    for name in grads_r:
        _assert_close(grads_f[name], grads_r[name], torch.float64, f"grad {name}")


def test_fold_bias_into_channels_pads_to_a_multiple_of_eight():
    q, k, v = torch.randn(1, 2, 5, 6), torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 6)
    bias = torch.randn(1, 1, 5, 3)
    q2, k2, v2 = fold_bias_into_channels(q, k, v, bias / 0.5, torch.eye(3)[None, None, [0, 1, 2, 0]])
    assert q2.shape[-1] == k2.shape[-1] == v2.shape[-1] == 16  # 6 + 3 -> 16
    logits = 0.5 * q2 @ k2.transpose(-1, -2)
    expected = 0.5 * q @ k.transpose(-1, -2) + bias[..., [0, 1, 2, 0]]
    assert torch.allclose(logits, expected, atol=1e-5)
    assert torch.all(v2[..., 6:] == 0)


def test_fused_encoder_equals_reference_encoder(region_map):
    """The whole tiny encoder, both paths with equal weights: every output and every parameter's gradient.

    In float32 the paths agree to rounding; under bf16 autocast each is compared with the float32
    reference, and the fused path must be about as close to it as the reference path itself.
    """
    torch.manual_seed(0)
    reference = tiny_encoder(region_map, attention_impl="reference").train()
    fused = tiny_encoder(region_map, attention_impl="fused").train()
    with torch.no_grad():
        for block in reference.blocks:
            block.attn.slice_bias.normal_()
    fused.load_state_dict(reference.state_dict())
    image = packed_input(torch.randint(0, 118, (2, 1, 12, 16, 24), generator=torch.Generator().manual_seed(3)))

    def run(net, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net.forward_features(image)
        loss = sum(_mix(out[k].float()) for k in ("global_embedding", "local_embedding", "region_embedding"))
        names, params = zip(*net.named_parameters())
        return out, dict(zip(names, torch.autograd.grad(loss, list(params))))

    out_r, grads_r = run(reference, False)
    out_f, grads_f = run(fused, False)
    for key in out_r:
        if out_r[key].is_floating_point():
            _assert_close(out_f[key], out_r[key], torch.float32, key)
        else:
            assert torch.equal(out_f[key], out_r[key]), key
    for name in grads_r:
        _assert_close(grads_f[name], grads_r[name], torch.float32, f"grad {name}")
    (_, bf_grads_r), (bf_out_f, bf_grads_f) = run(reference, True), run(fused, True)
    for key in ("global_embedding", "local_embedding", "region_embedding"):
        _assert_close(bf_out_f[key].float(), out_r[key], torch.bfloat16, key)

    def relative_error(grads: dict, names) -> float:
        num = sum((grads[n].float() - grads_r[n]).square().sum() for n in names)
        return (num / sum(grads_r[n].square().sum() for n in names)).sqrt().item()

    # bf16 rounding alone moves the gradients by about 1% overall; the fused path must do no worse
    err_f, err_r = relative_error(bf_grads_f, grads_r), relative_error(bf_grads_r, grads_r)
    assert err_f <= 1.5 * err_r + 2e-3 and err_f < 0.03, (err_f, err_r)
    for name in (n for n in grads_r if n.endswith("slice_bias")):
        assert relative_error(bf_grads_f, [name]) < 0.05, name
