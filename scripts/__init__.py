"""Anatomy-aware 3D CT vision-language encoder: the Python package of the MONAI bundle."""

from . import (
    anatomy_regions,
    checkpoints,
    data,
    engines,
    evaluation,
    flags,
    inference,
    losses,
    metrics,
    networks,
    visualize,
    zero_shot,
)
