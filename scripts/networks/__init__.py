"""Network modules of the bundle; they import torch, and the text tower `transformers`.

The image side is imported here. The text tower and the CLIP wrapper load on first use (PEP 562), so
``import scripts.networks`` works where only torch is installed (the GPU benchmark machine).
"""

import importlib

from .anatomy_encoder import AnatomyEncoder
from .block import TransformerBlock
from .heads import FindingHead, SegmentationAuxHead
from .patch_embedding import PatchEmbedding3D, patch_grid_positions
from .region_attention import RegionCrossAttention
from .slice_attention import SliceAwareSelfAttention
from .vision_encoder import AnatomyAwareCTEncoder

TEXT_SIDE = {"HFTextEncoder": ".text_encoder", "CTReportCLIP": ".clip_model"}


def __getattr__(name: str):
    if name in TEXT_SIDE:
        return getattr(importlib.import_module(TEXT_SIDE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(TEXT_SIDE))
