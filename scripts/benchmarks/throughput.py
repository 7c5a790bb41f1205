"""Forward latency, throughput, peak memory and a CLIP training step of the encoder on one device.

Imports torch and `scripts.networks` only, so it runs on a GPU machine without MONAI, Ignite, nibabel or
transformers (a `transformers` BERT is used for the text tower when installed, else a plain-torch
stand-in of the same size). Written for CUDA; every function also runs on the CPU at tiny sizes,
which is how the tests check it. Model FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode`
on the meta device with the ``"reference"`` attention path (the model's own arithmetic: head dim 64,
no folded bias channels); utilisation is model FLOP/s over the bf16 matmul rate measured in the same run.
"""

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from scripts.networks import AnatomyAwareCTEncoder
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
SEED_INPUT = (64, 512, 512)
# BERT-base (Devlin et al., arXiv:1810.04805): vocabulary, width, depth, heads, positions
BERT_BASE = {"vocab_size": 30522, "width": 768, "depth": 12, "heads": 12, "max_length": 512}


def region_class_ids() -> list[list[int]]:
    """The regions of `configs/regions.json` as TotalSegmentator v2 ids (`scripts.anatomy_regions`, stdlib only)."""
    from scripts.anatomy_regions import load_region_map

    return [list(ids) for ids in load_region_map(BUNDLE_ROOT / "configs/regions.json").class_ids]


def build_encoder(input_size: Sequence[int] = SEED_INPUT, **overrides) -> AnatomyAwareCTEncoder:
    """`AnatomyAwareCTEncoder` as `configs/train.json` builds it (seed widths, global head), with overrides."""
    kwargs = {"projection_heads": ("global",), "input_size": tuple(input_size), **overrides}
    return AnatomyAwareCTEncoder(region_class_ids(), **kwargs)


def synthetic_input(batch: int, input_size: Sequence[int], device, seed: int = 0) -> torch.Tensor:
    """``(B, 2, D, H, W)``: a windowed CT in [-1, 1] and random TotalSegmentator ids (the cost does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    ct = torch.rand(batch, 1, *input_size, generator=g) * 2 - 1
    labels = torch.randint(0, 118, (batch, 1, *input_size), generator=g).float()
    return torch.cat([ct, labels], dim=1).to(device)


def significant(value: float, digits: int = 3) -> float:
    """``value`` rounded to ``digits`` significant digits (figures of very different sizes share one format)."""
    return float(f"{value:.{digits}g}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> Optional[float]:
    """Peak allocated device memory since the last reset (CUDA), ``None`` on the CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones (compiles happen there)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def inference(call: Callable, image: torch.Tensor, device_type: str, dtype: Optional[torch.dtype]) -> Callable:
    """A function of no arguments running ``call(image)`` in inference mode under autocast (``dtype`` None: off)."""

    def run():
        with torch.inference_mode(), torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            return call(image)

    return run


def _bincount_shape(values: torch.Tensor, weights: Optional[torch.Tensor] = None, minlength: int = 0):
    """Meta kernel of `torch.bincount`: ``minlength`` bins (exact where, as in the encoder, every value is below it)."""
    return values.new_empty(minlength, dtype=torch.int64 if weights is None else weights.dtype)


def model_flops(build: Callable[[], nn.Module], inputs: Callable[[], tuple]) -> int:
    """Forward FLOPs of ``build()(*inputs())``, counted on the meta device (nothing is computed).

    `torch.bincount` (the label-map count) has no meta kernel, its output size depending on the data;
    one is registered for the duration of the count.
    """
    library = torch.library.Library("aten", "IMPL")
    library.impl("bincount", _bincount_shape, "Meta")
    try:
        with torch.device("meta"):
            module, args = build(), inputs()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(*args)
    finally:
        library._destroy()
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """Measured dense matmul rate (TFLOP/s) of an ``n x n x n`` product: the utilisation denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, repeats, warmup=3)
    return 2 * n**3 / statistics.median(seconds) / 1e12


class TextTowerStandIn(nn.Module):
    """A BERT-base-sized text encoder in plain torch, for machines without `transformers`.

    Token and position embeddings, LayerNorm, ``depth`` post-norm `nn.TransformerEncoderLayer` blocks
    (GELU, FFN 4x), the first token projected to ``E`` and L2-normalised: BERT-base's layout and
    parameter count, randomly initialised (no weights reach the GPU machine).

    Shapes:
        ``forward(tokens (B, L)) -> (B, E)``.
    """

    def __init__(
        self, projection_dim: int, vocab_size: int, width: int, depth: int, heads: int, max_length: int
    ) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(max_length, width)
        self.norm = nn.LayerNorm(width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True)
            for _ in range(depth)
        )
        self.projection = nn.Linear(width, projection_dim, bias=False)
        self.gradient_checkpointing = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.norm(self.token(tokens) + self.position(positions)[None])  # (B, L, width)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return F.normalize(self.projection(x[:, 0]), dim=-1)


class BertTextTower(nn.Module):
    """`transformers.BertModel` (no pooler) with a projection of the CLS token: used when `transformers` is installed."""

    def __init__(self, projection_dim: int, vocab_size: int, width: int, depth: int, heads: int, max_length: int):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=width,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            intermediate_size=4 * width,
            max_position_embeddings=max_length,
        )
        self.model = BertModel(config, add_pooling_layer=False)
        self.projection = nn.Linear(width, projection_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=tokens).last_hidden_state  # (B, L, width)
        return F.normalize(self.projection(hidden[:, 0]), dim=-1)


def text_tower(
    projection_dim: int, gradient_checkpointing: bool, prefer_transformers: bool = True, **size
) -> nn.Module:
    """BERT-base-sized text tower (``size`` overrides `BERT_BASE`): `transformers` if importable, else the stand-in."""
    size = {**BERT_BASE, **size}
    if prefer_transformers:
        try:
            tower = BertTextTower(projection_dim, **size)
            if gradient_checkpointing:
                tower.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return tower
        except ImportError:
            pass
    tower = TextTowerStandIn(projection_dim, **size)
    tower.gradient_checkpointing = gradient_checkpointing
    return tower


def forward_figures(
    impl: str,
    device: torch.device,
    batches: Sequence[int] = (1, 8),
    input_size: Sequence[int] = SEED_INPUT,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    repeats: int = 10,
    peak_tflops: Optional[float] = None,
    **encoder_overrides,
) -> dict:
    """Inference figures of the encoder with one attention path: latency, volumes/s and peak memory per batch size.

    ``dtype`` is the autocast dtype (``None``: float32). Model FLOPs and, with ``peak_tflops``, the
    utilisation are given per batch size.
    """
    torch.manual_seed(0)
    net = build_encoder(input_size, attention_impl=impl, **encoder_overrides).to(device).eval()
    flops_one = model_flops(
        lambda: build_encoder(input_size, attention_impl="reference", **encoder_overrides),
        lambda: (torch.empty(1, 2, *input_size),),
    )
    result = {"attention_impl": impl, "model_gflops_per_volume": significant(flops_one / 1e9, 4), "batches": {}}
    for batch in batches:
        image = synthetic_input(batch, input_size, device)
        reset_peak_memory(device)

        seconds = statistics.median(timed(inference(net, image, device.type, dtype), device, repeats))
        entry = {
            "latency_ms": round(1000 * seconds, 2),
            "volumes_per_s": round(batch / seconds, 2),
            "peak_memory_gb": peak_memory_gb(device),
        }
        if peak_tflops:
            entry["model_flops_utilisation"] = significant(flops_one * batch / seconds / 1e12 / peak_tflops)
        result["batches"][str(batch)] = entry
        del image
    return result


def training_step_figures(
    device: torch.device,
    batch: int = 8,
    input_size: Sequence[int] = SEED_INPUT,
    text_length: int = 512,
    dtype: Optional[torch.dtype] = torch.bfloat16,
    repeats: int = 5,
    peak_tflops: Optional[float] = None,
    text_size: Optional[dict] = None,
    prefer_transformers: bool = True,
    **encoder_overrides,
) -> dict:
    """One CLIP step: image encoder (checkpointing on, ``"fused"``) + text tower, InfoNCE, backward, AdamW.

    Returns volumes/s, seconds per step, peak memory, the text tower used and, with ``peak_tflops``, the
    model-FLOPs utilisation (3 x forward FLOPs per step: backward counts twice; recompute not counted).
    """
    torch.manual_seed(0)
    overrides = {"attention_impl": "fused", "gradient_checkpointing": True, **encoder_overrides}
    image_encoder = build_encoder(input_size, **overrides).to(device).train()
    projection_dim = image_encoder.global_head.out_features
    size = text_size or {}
    text = text_tower(projection_dim, True, prefer_transformers, **size).to(device).train()
    log_scale = nn.Parameter(torch.tensor(2.659, device=device))  # log(1 / 0.07)
    params = [*image_encoder.parameters(), *text.parameters(), log_scale]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    image = synthetic_input(batch, input_size, device)
    vocab = {**BERT_BASE, **size}["vocab_size"]
    tokens = torch.randint(0, vocab, (batch, text_length), generator=torch.Generator().manual_seed(0)).to(device)
    targets = torch.arange(batch, device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = log_scale.exp() * image_encoder(image) @ text(tokens).T  # (B, B)
            loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    reset_peak_memory(device)
    seconds = statistics.median(timed(step, device, repeats))
    image_flops = model_flops(
        lambda: build_encoder(input_size, **{**overrides, "attention_impl": "reference"}),
        lambda: (torch.empty(batch, 2, *input_size),),
    )
    text_flops = model_flops(
        lambda: text_tower(projection_dim, False, False, **size), lambda: (torch.zeros(batch, text_length).long(),)
    )
    result = {
        "batch": batch,
        "text_tower": type(text).__name__,
        "text_parameters_m": round(sum(p.numel() for p in text.parameters()) / 1e6, 1),
        "image_parameters_m": round(sum(p.numel() for p in image_encoder.parameters()) / 1e6, 1),
        "text_tokens": text_length,
        "seconds_per_step": round(seconds, 4),
        "volumes_per_s": round(batch / seconds, 2),
        "peak_memory_gb": peak_memory_gb(device),
        "model_tflops_per_step": significant(3 * (image_flops + text_flops) / 1e12),
    }
    if peak_tflops:
        result["model_flops_utilisation"] = significant(3 * (image_flops + text_flops) / seconds / 1e12 / peak_tflops)
    return result


def device_figures(
    device: torch.device, impls: Sequence[str], batches: Sequence[int], dtype: Optional[torch.dtype], repeats: int
) -> dict:
    """Everything measured on an accelerator: matmul peak, forward figures per path, the training step."""
    peak = matmul_tflops(device, torch.bfloat16 if dtype is None else dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else "float32",
        "input_size": list(SEED_INPUT),
        "matmul_tflops": round(peak, 1),
        "forward": [forward_figures(i, device, batches, SEED_INPUT, dtype, repeats, peak) for i in impls],
        "training_step": training_step_figures(device, 8, SEED_INPUT, 512, dtype, max(3, repeats // 2), peak),
        "date": time.strftime("%Y-%m-%d"),
    }
