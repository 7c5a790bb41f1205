"""The CLIP-style pair of towers: CT encoder, report text encoder and a learnable logit scale."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .text_encoder import HFTextEncoder
from .vision_encoder import AnatomyAwareCTEncoder


class CTReportCLIP(nn.Module):
    """CT and report towers trained contrastively (CLIP, arXiv:2103.00020).

    The logit scale is learned as ``log(scale)``, initialised to ``log(1 / 0.07)``, and used as
    ``exp(min(log_scale, log(max_logit_scale)))``: clamped at 100 as in CLIP (sec. 2.5), without the
    in-place clamp of the parameter.

    Args:
        image_encoder: the ``network_def`` (`AnatomyAwareCTEncoder`).
        text_encoder: `HFTextEncoder`; its projection width must equal the image encoder's.
        logit_scale_init: initial value of the scale (not its log).
        max_logit_scale: upper clamp of the scale.

    Shapes:
        ``forward(image (B, 2, D, H, W), texts, extra_texts=(), text_tokens=False)`` returns
        ``image_features`` (the encoder's `forward_features` dict, with ``global_embedding (B, E)``),
        ``text_embedding (B, E)``, ``logit_scale`` (0-dim), ``extra_text_embedding (M, E)`` for
        ``extra_texts`` (region sentences, reasoning steps: one text-tower pass for all of them) and, with
        ``text_tokens=True``, ``token_embedding (B, L, E)`` and ``token_mask (B, L)`` of ``texts``.
        Everything runs in this one forward, as DDP requires.

    Raises:
        ValueError: the two towers' embedding widths differ.
    """

    def __init__(
        self,
        image_encoder: AnatomyAwareCTEncoder,
        text_encoder: HFTextEncoder,
        logit_scale_init: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        image_dim = image_encoder.global_head.out_features
        text_dim = text_encoder.projection.out_features
        if image_dim != text_dim:
            raise ValueError(f"image embedding width {image_dim} != text embedding width {text_dim}")
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale_init)))
        self.max_log_logit_scale = math.log(max_logit_scale)

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def forward(
        self, image: torch.Tensor, texts: Sequence[str], extra_texts: Sequence[str] = (), text_tokens: bool = False
    ) -> dict:
        out = {"image_features": self.image_encoder.forward_features(image), "logit_scale": self.logit_scale()}
        if text_tokens:
            out["text_embedding"], out["token_embedding"], out["token_mask"] = self.text_encoder.forward_with_tokens(
                texts
            )
        else:
            out["text_embedding"] = self.text_encoder(texts)
        if extra_texts:
            out["extra_text_embedding"] = self.text_encoder(list(extra_texts))
        return out
