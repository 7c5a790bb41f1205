"""Network modules of the bundle; they import torch and transformers only."""

from .anatomy_encoder import AnatomyEncoder
from .block import TransformerBlock
from .clip_model import CTReportCLIP
from .heads import FindingHead, SegmentationAuxHead
from .patch_embedding import PatchEmbedding3D, patch_grid_positions
from .region_attention import RegionCrossAttention
from .slice_attention import SliceAwareSelfAttention
from .text_encoder import HFTextEncoder
from .vision_encoder import AnatomyAwareCTEncoder
