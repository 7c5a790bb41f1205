"""Anatomy-aware 3D CT vision-language encoder: the Python package of the MONAI bundle.

Submodules load on first use (PEP 562): ``import scripts.networks`` needs only torch (MONAI is not
imported), while config expressions such as ``$scripts.data.load_pairs(...)`` after ``$import scripts``
reach every submodule as if all had been imported here. A new module under ``scripts/`` needs no entry.
"""

import importlib
import pkgutil


def __getattr__(name: str):
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise  # the submodule exists but needs a package that is missing: say which
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *(m.name for m in pkgutil.iter_modules(__path__))])
