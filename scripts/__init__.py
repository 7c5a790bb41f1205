"""Anatomy-aware 3D CT vision-language encoder: the Python package of the MONAI bundle.

Submodules load on first use (PEP 562), so ``import scripts.networks`` needs only torch (MONAI is not
imported), while config expressions such as ``$scripts.data.load_pairs(...)`` after ``$import scripts``
work as if every submodule had been imported here.
"""

import importlib

SUBMODULES = (
    "ablation",
    "anatomy_regions",
    "benchmarks",
    "checkpoints",
    "data",
    "engines",
    "errors",
    "evaluation",
    "flags",
    "inference",
    "losses",
    "metrics",
    "networks",
    "run_record",
    "visualize",
    "zero_shot",
)


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(SUBMODULES))
