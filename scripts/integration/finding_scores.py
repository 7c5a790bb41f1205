"""The 18 CT-RATE finding scores of a global embedding, as a MONAI post-processing transform (MONAI Label)."""

from __future__ import annotations

from monai.config import KeysCollection
from monai.transforms import MapTransform

from ..zero_shot import load_prompt_embeddings, sha256_file


class FindingScoresd(MapTransform):
    """Zero-shot probabilities of the 18 CT-RATE findings from the network's global embedding.

    ``data[key]``: the L2-normalised global embedding ``(E,)`` (or ``(B, E)``) of `AnatomyAwareCTEncoder`;
    replaced by the probabilities ``(18,)`` (or ``(B, 18)``) in `scripts.data.FINDINGS` order, each the softmax
    over its ("present", "absent") prompt pair scaled by the trained logit scale (CT-CLIP, arXiv:2403.17834;
    `scripts.zero_shot`). The prompt embeddings come from ``prompt_embeddings_file``, which must have been made
    from ``prompt_file`` for the weights in ``model_file``.

    Raises:
        ValueError: the prompt-embedding file is missing, of another format, made from another prompt file or for
            other weights (the message says how to remake it); an embedding of another width.
    """

    def __init__(self, keys: KeysCollection, prompt_embeddings_file: str, prompt_file: str, model_file: str) -> None:
        super().__init__(keys)
        self.prompts, reason = load_prompt_embeddings(prompt_embeddings_file, prompt_file, sha256_file(model_file))
        if self.prompts is None:
            raise ValueError(f"finding scores unavailable: {reason}")

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            embedding = d[key]
            batched = embedding.ndim == 2
            scores = self.prompts.probabilities(embedding.float() if batched else embedding.float()[None])
            d[key] = scores if batched else scores[0]
        return d
