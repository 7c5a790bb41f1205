"""Anatomy-aware 3D CT vision-language encoder: the Python package of the MONAI bundle."""

from . import (
    anatomy_regions,
    checkpoints,
    data,
    engines,
    errors,
    evaluation,
    flags,
    inference,
    losses,
    metrics,
    networks,
    run_record,
    visualize,
    zero_shot,
)
