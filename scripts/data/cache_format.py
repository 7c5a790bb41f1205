"""Preprocessing cache files that `torch.load(..., weights_only=True)` reads: tensors and plain metadata only.

MONAI's `PersistentDataset` pickles whole MetaTensors, which must be read with ``weights_only=False``: a
cache file that someone else wrote could then run code when it is loaded. Here a cached item is stored as
``{"format": CACHE_FORMAT, "item": ...}`` where each MetaTensor becomes ``{"__metatensor__": tensor,
"meta": plain dict}`` and is rebuilt on reading. The meta keeps the keys of `KEPT_META` (the grid and
the file name; the source file's raw NIfTI header fields, stale after resampling, are left out: they
would triple the read time); NumPy arrays become tensors or lists, enums their values, anything else
its ``str``. A file in another form is refused by the reader.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor

CACHE_FORMAT = "ct_report_cache/1"
_TENSOR = "__metatensor__"
KEPT_META = (
    "affine",
    "original_affine",
    "spatial_shape",
    "space",
    "original_channel_dim",
    "filename_or_obj",
    "hu_rescaled",
    "no_label_map",
)


def to_plain(value):
    """A copy of a (nested) item that holds only tensors, numbers, strings, ``None``, lists, tuples and dicts."""
    if isinstance(value, MetaTensor):
        return {_TENSOR: value.as_tensor(), "meta": to_plain({k: v for k, v in value.meta.items() if k in KEPT_META})}
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy()) if value.dtype.kind in "biuf" else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return to_plain(value.value)
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
    return str(value)


def from_plain(value):
    """Rebuild the MetaTensors of a `to_plain` item."""
    if isinstance(value, dict):
        if _TENSOR in value:
            return MetaTensor(value[_TENSOR], meta=from_plain(value["meta"]))
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(from_plain(v) for v in value)
    return value


def write_cache_file(item: dict, path: Path) -> None:
    """Write a cache file atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"format": CACHE_FORMAT, "item": to_plain(item)}, tmp)
    os.replace(tmp, path)


def read_cache_file(path: Path) -> dict:
    """Read a cache file with ``weights_only=True``.

    Raises:
        pickle.UnpicklingError: the file holds objects other than tensors and plain data (a pickle that
            could run code, or a MONAI MetaTensor cache of an older version); nothing in it is executed.
        ValueError: the file is not in `CACHE_FORMAT`.
        RuntimeError, EOFError: the file is truncated or corrupt.
    """
    obj = torch.load(path, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not a cache file of format {CACHE_FORMAT}")
    return from_plain(obj["item"])
