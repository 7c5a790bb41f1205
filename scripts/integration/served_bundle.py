"""A bundle folder as MONAI Label and MONAI Deploy serve it, for a model trained with config overrides.

MONAI Label's `BundleInferTask` reads ``configs/inference.json`` alone, so a model trained with an override (the
demo's ``configs/demo.json``) is served from a copy of the bundle whose ``inference.json`` has the overrides
merged in, with that model's weights and prompt embeddings in ``models/``.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[2]


def write_served_bundle(
    dest: str | Path, clip_model: torch.nn.Module, overrides: Sequence[str] = (), bundle_root: str | Path = BUNDLE_ROOT
) -> Path:
    """Write ``dest/`` as a servable bundle folder for ``clip_model`` trained with ``overrides``.

    ``dest/configs`` is a copy of the bundle's configs with ``inference.json`` replaced by ``inference.json`` and
    ``overrides`` (paths relative to ``bundle_root``, merged in order, as ``--config_file "[...]"`` merges them);
    ``dest/scripts`` links to the bundle's code; ``dest/models/model.pt`` is the strict state dict of
    ``clip_model.image_encoder`` (``network_def``) and ``dest/models/prompt_embeddings.safetensors`` the prompts of
    ``configs/zero_shot_prompts.json`` embedded by ``clip_model``'s text tower.

    Args:
        dest: folder to create (must not exist).
        clip_model: a `scripts.networks.CTReportCLIP` built from ``train.json`` with the same overrides.
        overrides: config files merged over ``configs/inference.json``, e.g. ``["configs/demo.json"]``.
        bundle_root: the bundle to copy.

    Returns:
        ``dest`` as a `Path`.

    Raises:
        FileExistsError: ``dest`` exists (nothing is overwritten).
    """
    from monai.bundle import ConfigParser
    from scripts.evaluation import load_prompt_templates
    from scripts.zero_shot import save_prompt_embeddings

    root, bundle_root = Path(dest), Path(bundle_root)
    if root.exists():
        raise FileExistsError(f"{root}: exists; write_served_bundle never overwrites a folder")
    shutil.copytree(bundle_root / "configs", root / "configs")
    (root / "scripts").symlink_to(bundle_root / "scripts", target_is_directory=True)
    merged = ConfigParser()
    merged.read_config([str(bundle_root / "configs/inference.json"), *(str(bundle_root / o) for o in overrides)])
    ConfigParser.export_config_file(merged.get(), str(root / "configs/inference.json"), indent=4)
    (root / "models").mkdir()
    torch.save(clip_model.image_encoder.state_dict(), root / "models/model.pt")
    prompt_file = root / "configs/zero_shot_prompts.json"
    save_prompt_embeddings(clip_model, load_prompt_templates(prompt_file), prompt_file, root / "models/model.pt")
    return root
