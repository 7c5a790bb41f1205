"""Report text encoder: a Hugging Face `transformers` BERT-family model with a projection head."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

POOLINGS = ("cls", "mean")


class HFTextEncoder(nn.Module):
    """Encode report text with a pretrained `transformers` encoder and project it to the joint space.

    The model is built without its pooler (``add_pooling_layer=False``: the pooler would get no gradient,
    which DDP refuses). Text is tokenised here with the model's own tokenizer, truncated to
    ``max_length`` tokens.

    Args:
        model_name_or_path: a local folder or a Hugging Face hub id (hub ids need network access or a
            filled local cache), e.g. ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext``.
        projection_dim: embedding width ``E``.
        pooling: ``"cls"`` (the first token, BERT-style) or ``"mean"`` (mean over non-padding tokens,
            sentence-transformers style).
        max_length: token limit per text (at most the model's position limit).
        trainable: ``False`` freezes the transformer (run without gradients); the projection always trains.
        gradient_checkpointing: recompute transformer layers in backward (trainable models only).

    Shapes:
        ``forward(texts: list[str]) -> (B, E)``, L2-normalised; `forward_with_tokens` adds the token
        embeddings ``(B, L, E)`` and the attention mask ``(B, L)``.

    Raises:
        ValueError: unknown ``pooling``, a flag that is not a bool, a local path that does not exist.
        OSError: (from `transformers`) the model cannot be found.
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        projection_dim: int = 512,
        pooling: str = "cls",
        max_length: int = 512,
        trainable: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        for key, value in (("text_trainable", trainable), ("gradient_checkpointing", gradient_checkpointing)):
            if not isinstance(value, bool):
                raise ValueError(f"{key} must be True or False, got {value!r}")
        name = str(model_name_or_path)
        if name.startswith(("/", ".", "~")) and not Path(name).expanduser().is_dir():
            raise ValueError(f"text model folder {name} does not exist (text_model_name: a local folder or a hub id)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_name_or_path))
        self.model = AutoModel.from_pretrained(str(model_name_or_path), add_pooling_layer=False)
        self.model.requires_grad_(trainable)
        if trainable and gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.trainable = trainable
        self.pooling = pooling
        self.max_length = min(max_length, self.model.config.max_position_embeddings)
        self.projection = nn.Linear(self.model.config.hidden_size, projection_dim, bias=False)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask ``(B, L)`` of ``texts``, padded to the longest, truncated."""
        return self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        hidden, attention_mask = self._hidden_states(texts)
        return self._pooled_embedding(hidden, attention_mask)

    def forward_with_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled and token-level embeddings from one transformer pass (for the FILIP-style local loss).

        Returns:
            ``embedding (B, E)``, equal to ``forward(texts)``; ``tokens (B, L, E)``, each token's last
            hidden state through the same projection, L2-normalised (padding positions included: mask
            them); ``attention_mask (B, L)`` bool, True for real tokens ([CLS] and [SEP] included).
        """
        hidden, attention_mask = self._hidden_states(texts)
        tokens = F.normalize(self.projection(hidden), dim=-1)  # (B, L, H) -> (B, L, E)
        return self._pooled_embedding(hidden, attention_mask), tokens, attention_mask.bool()

    def _hidden_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states ``(B, L, H)`` and attention mask ``(B, L)`` of ``texts``."""
        device = self.projection.weight.device
        tokens = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            hidden = self.model(**tokens).last_hidden_state  # (B, L, H)
        return hidden, tokens["attention_mask"]

    def _pooled_embedding(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden[:, 0]  # (B, H)
        else:
            mask = attention_mask[..., None].to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, H)
        return F.normalize(self.projection(pooled), dim=-1)

    def train(self, mode: bool = True) -> HFTextEncoder:
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # a frozen transformer keeps dropout off
        return self
