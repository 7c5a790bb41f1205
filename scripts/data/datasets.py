"""Datasets and collation for CT-report pairs: cached preprocessing that survives bad cases."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
from collections.abc import Sequence

from monai.data import MetaTensor, PersistentDataset, list_data_collate
from monai.data.utils import pickle_hashing

from ..flags import require_bool
from .transforms import BadCaseError

logger = logging.getLogger(__name__)

# per-item fields whose length varies between items: kept as lists, one entry per item
LIST_KEYS = ("region_text", "cot_steps", "region_sentences")
FILE_KEYS = ("image", "seg")


def collate_reports(batch: Sequence[dict]) -> dict:
    """Collate CT-report items: tensors and strings as MONAI's `list_data_collate` does, and the
    variable-length fields of `LIST_KEYS` as plain lists (``batch["cot_steps"][i]`` is item ``i``'s).
    Tensors are collated without metadata (items read from the cache and computed afresh then agree)."""
    lists = {k: [item[k] for item in batch] for k in LIST_KEYS if k in batch[0]}
    plain = [
        {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in item.items() if k not in lists}
        for item in batch
    ]
    collated = list_data_collate(plain)
    collated.update(lists)
    return collated


def item_hash(item: dict) -> bytes:
    """Cache key of a datalist item: the item itself plus the size and modification time of its files, so
    a CT or mask replaced at the same path is preprocessed again instead of read from a stale cache."""
    stamps = {}
    for key in FILE_KEYS:
        if isinstance(item.get(key), str) and os.path.exists(item[key]):
            stat = os.stat(item[key])
            stamps[key] = (stat.st_size, stat.st_mtime_ns)
    return pickle_hashing({"item": item, "files": stamps})


def _bad_case(err: BaseException) -> BadCaseError | None:
    """The `BadCaseError` behind an exception (MONAI wraps transform errors in RuntimeError), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BadCaseError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _describe_failure(item: dict, err: BaseException) -> str:
    """Which of an item's files failed to load, and why (run only when a case has failed)."""
    from monai.transforms import LoadImage

    unreadable = []
    for key in FILE_KEYS:
        if isinstance(item.get(key), str):
            try:
                LoadImage(image_only=True)(item[key])
            except Exception as load_err:
                cause = _root_cause(load_err)
                unreadable.append(f"{item[key]} ({key}) unreadable: {type(cause).__name__}: {cause}")
    if unreadable:
        return "; ".join(unreadable)
    cause = _root_cause(err)
    files = ", ".join(str(item[k]) for k in FILE_KEYS if k in item)
    return f"{files}: {type(cause).__name__}: {cause}"


class CTReportDataset(PersistentDataset):
    """`PersistentDataset` whose deterministic preprocessing is cached on disk, and which can skip bad cases.

    The cache keeps MetaTensors with their metadata (affine, file name) and keys each case by its
    datalist entry and the size and time stamp of its files (`item_hash`). With ``skip_bad_cases=True``
    a case that cannot be preprocessed (a check's `BadCaseError`: mask on another grid, CT not in HU, too
    few slices, ids that are not TotalSegmentator's; or any error while reading it, such as a truncated
    ``.nii.gz``) is logged once with its file names and replaced by the next good case, so one broken
    volume neither stops a long run nor is trained on. More than ``max_bad_fraction`` of the cases
    refused stops the run: that is a data problem, not a few bad volumes. Refusals are counted once per
    case over the whole run, in shared memory that the data-loader workers inherit (fork, the Linux
    default; under spawn each worker counts its own). ``bad_cases`` holds the refused indices and
    messages seen by this process, ``refused_count`` the run's total. A cache file that cannot be read
    back (truncated, say) is deleted and recomputed with a warning naming it, not blamed on the CT.

    The other arguments are `PersistentDataset`'s: set ``hash_transform`` (e.g.
    ``monai.data.utils.pickle_hashing``) so a changed preprocessing never reuses a stale cache. The cache
    is read with ``weights_only=False`` (it holds MetaTensors): point ``cache_dir`` at a folder only this
    bundle writes.

    Raises:
        BadCaseError: a refused case, when ``skip_bad_cases=False`` (the check's own message).
        RuntimeError: more than ``max_bad_fraction`` of the cases refused, or every case refused.
        ValueError: ``skip_bad_cases`` is not a bool.
    """

    def __init__(
        self,
        data: Sequence,
        transform,
        cache_dir: str | None,
        hash_transform=None,
        skip_bad_cases: bool = True,
        max_bad_fraction: float = 0.1,
    ) -> None:
        super().__init__(
            data=data,
            transform=transform,
            cache_dir=cache_dir,
            hash_func=item_hash,
            hash_transform=hash_transform,
            track_meta=True,
            weights_only=False,
        )
        self.skip_bad_cases = require_bool(skip_bad_cases, "skip_bad_cases")
        self.max_bad_fraction = max_bad_fraction
        self._forget_refusals()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_refused"] = bytearray(bytes(self._refused))  # pickled (spawn): counted per process
        return state

    def set_data(self, data: Sequence) -> None:
        """Replace the datalist (MONAI's `set_data`: the cache folder is emptied) and forget refusals."""
        super().set_data(data)
        self._forget_refusals()

    def _forget_refusals(self) -> None:
        self.bad_cases: dict[int, str] = {}
        self._refused = multiprocessing.RawArray(ctypes.c_bool, len(self.data))  # one flag per case, shared

    @property
    def refused_count(self) -> int:
        """Cases refused so far in this run, over all data-loader workers (fork) and epochs."""
        return sum(self._refused)

    def _cachecheck(self, item_transformed):
        hashfile = None
        if self.cache_dir is not None:
            hashfile = self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"
        cached = hashfile is not None and hashfile.is_file()
        try:
            return super()._cachecheck(item_transformed)
        except Exception as err:
            if not (cached and hashfile.is_file()):
                raise  # the case itself failed, not reading its cache file
            logger.warning(
                f"{hashfile}: cache file unreadable ({type(err).__name__}: {err}); deleted, recomputing "
                + ", ".join(str(item_transformed.get(k)) for k in FILE_KEYS if k in item_transformed)
            )
            hashfile.unlink(missing_ok=True)
            return super()._cachecheck(item_transformed)

    def _transform(self, index: int):
        for offset in range(len(self.data)):
            i = (index + offset) % len(self.data)
            if self._refused[i]:
                continue
            try:
                return super()._transform(i)
            except Exception as err:
                bad = _bad_case(err)
                if not self.skip_bad_cases:  # the check's own message, or the file that failed, not MONAI's wrapper
                    raise (bad or BadCaseError(_describe_failure(self.data[i], err))) from err
                self.bad_cases[i] = str(bad) if bad is not None else _describe_failure(self.data[i], err)
                first_time = not self._refused[i]
                self._refused[i] = True
                refused = self.refused_count
                if first_time:
                    logger.warning(
                        f"skipping case {i} ({refused} of {len(self.data)} refused so far): {self.bad_cases[i]}"
                    )
                if refused > max(1, self.max_bad_fraction * len(self.data)):
                    shown = "\n  ".join(list(self.bad_cases.values())[:10])
                    raise RuntimeError(
                        f"{refused} of {len(self.data)} cases refused, more than max_bad_fraction="
                        f"{self.max_bad_fraction}; seen by this process:\n  {shown}"
                    ) from err
        raise RuntimeError(
            f"all {len(self.data)} cases were refused; first: {next(iter(self.bad_cases.values()), '?')}"
        )
