"""Datasets and collation for CT-report pairs: cached preprocessing that survives bad cases."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path

import torch
import torch.distributed as dist
from monai.data import MetaTensor, PersistentDataset, list_data_collate
from monai.data.utils import pickle_hashing
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from ..flags import require_bool
from .cache_format import from_plain, read_cache_file, to_plain, write_cache_file
from .transforms import BadCaseError

logger = logging.getLogger(__name__)

# per-item fields whose length varies between items: kept as lists, one entry per item
LIST_KEYS = ("region_text", "cot_steps", "region_sentences")
FILE_KEYS = ("image", "seg")


def collate_reports(batch: Sequence[dict]) -> dict:
    """Collate CT-report items: tensors and strings as MONAI's `list_data_collate` does, and the
    variable-length fields of `LIST_KEYS` as plain lists (``batch["cot_steps"][i]`` is item ``i``'s).

    A key that only some items carry (``cot`` for a few cases, say) never decides whether a batch
    collates: it becomes a list with ``None`` for the items without it. Tensors are collated without
    metadata (items read from the cache and computed afresh then agree)."""
    keys = list(dict.fromkeys(k for item in batch for k in item))
    ragged = [k for k in keys if k in LIST_KEYS or any(k not in item for item in batch)]
    lists = {k: [item.get(k) for item in batch] for k in ragged}
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

    The cache keys each case by its datalist entry and the size and time stamp of its files (`item_hash`)
    and stores tensors and plain metadata (affine, file name) that load with ``weights_only=True``
    (`scripts.data.cache_format`); a cache file that cannot be read back that way (truncated, written by
    an older version, or a pickle that would run code) is deleted and recomputed with a warning naming
    it, never executed and never blamed on the CT. `fill_cache` fills the cache before training, with a
    progress bar.

    With ``skip_bad_cases=True`` a case that cannot be preprocessed (a check's `BadCaseError`: mask on
    another grid, CT not in HU, too few slices, ids that are not TotalSegmentator's; or any error while
    reading it, such as a truncated ``.nii.gz``) is logged once with its file names and replaced by the
    next good case, so one broken volume neither stops a long run nor is trained on. When the refused
    cases exceed ``max_bad_fraction`` of all cases the run stops: that is a data problem, not a few bad
    volumes (0.1 of 3 cases is 0.3: one refused case stops it). Refusals are counted once per case over
    the whole run, in shared memory that the data-loader workers inherit (fork, the Linux default; under
    spawn each worker counts its own). ``bad_cases`` holds the refused indices and messages seen by this
    process, ``refused_count`` the run's total.

    The other arguments are `PersistentDataset`'s: set ``hash_transform`` (e.g.
    ``monai.data.utils.pickle_hashing``) so a changed preprocessing never reuses a stale cache.

    Raises:
        BadCaseError: a refused case, when ``skip_bad_cases=False`` (the check's own message).
        RuntimeError: refused cases above ``max_bad_fraction`` of the cases, or every case refused.
        ValueError: ``skip_bad_cases`` is not a bool, or ``max_bad_fraction`` is not in [0, 1].
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
        )
        self.skip_bad_cases = require_bool(skip_bad_cases, "skip_bad_cases")
        if isinstance(max_bad_fraction, bool) or not 0.0 <= float(max_bad_fraction) <= 1.0:
            raise ValueError(f"max_bad_fraction must be a fraction in [0, 1], got {max_bad_fraction!r}")
        self.max_bad_fraction = float(max_bad_fraction)
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

    def cache_file(self, item: dict) -> Path | None:
        """The cache file of a datalist item (``None`` without a cache folder)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed):
        hashfile = self.cache_file(item_transformed)
        if hashfile is not None and hashfile.is_file():
            try:
                return read_cache_file(hashfile)
            except Exception as err:
                reason = (str(err).strip().splitlines() or [""])[0]
                logger.warning(
                    f"{hashfile}: cache file refused ({type(err).__name__}: {reason}); deleted, recomputing "
                    + ", ".join(str(item_transformed.get(k)) for k in FILE_KEYS if k in item_transformed)
                )
                hashfile.unlink(missing_ok=True)
        computed = self._pre_transform(deepcopy(item_transformed))  # keep the hashed item as it was
        if hashfile is not None:
            write_cache_file(computed, hashfile)
        return from_plain(to_plain(computed))  # what a later read of the cache gives

    def _refuse(self, i: int, err: BaseException) -> None:
        """Record case ``i`` as refused (logged once), or raise when refusals are not skipped or too many."""
        bad = _bad_case(err)
        if not self.skip_bad_cases:  # the check's own message, or the file that failed, not MONAI's wrapper
            raise (bad or BadCaseError(_describe_failure(self.data[i], err))) from err
        self.bad_cases[i] = str(bad) if bad is not None else _describe_failure(self.data[i], err)
        first_time = not self._refused[i]
        self._refused[i] = True
        refused = self.refused_count
        if first_time:
            logger.warning(f"skipping case {i} ({refused} of {len(self.data)} refused so far): {self.bad_cases[i]}")
        if refused > self.max_bad_fraction * len(self.data):
            shown = "\n  ".join(list(self.bad_cases.values())[:10])
            raise RuntimeError(
                f"{refused} of {len(self.data)} cases refused, more than max_bad_fraction="
                f"{self.max_bad_fraction} of them; seen by this process:\n  {shown}"
            ) from err

    def _transform(self, index: int):
        for offset in range(len(self.data)):
            i = (index + offset) % len(self.data)
            if self._refused[i]:
                continue
            try:
                return super()._transform(i)
            except Exception as err:
                self._refuse(i, err)
        raise RuntimeError(
            f"all {len(self.data)} cases were refused; first: {next(iter(self.bad_cases.values()), '?')}"
        )

    def fill_cache(self, num_workers: int = 0) -> int:
        """Preprocess and cache every case that is not cached yet, before the first epoch, with a progress bar.

        Under DDP each rank fills every ``world_size``-th case. Refused cases are recorded as in training
        (skipped, or raising per ``skip_bad_cases`` and ``max_bad_fraction``).

        Args:
            num_workers: data-loader processes that preprocess in parallel (0: this process).

        Returns:
            the number of cases preprocessed by this process.
        """
        if self.cache_dir is None:
            return 0
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        todo = [
            i
            for i in range(rank, len(self.data), world)
            if not self._refused[i] and not self.cache_file(self.data[i]).is_file()
        ]
        if not todo:
            logger.info(f"preprocessing cache {self.cache_dir}: all {len(self.data)} cases are cached")
            return 0
        logger.info(f"filling the preprocessing cache {self.cache_dir}: {len(todo)} of {len(self.data)} cases")
        # its own generator: filling the cache draws nothing from the global RNG that training uses
        loader = DataLoader(
            _CacheFiller(self, todo), batch_size=None, num_workers=num_workers, generator=torch.Generator()
        )
        desc = f"filling preprocessing cache ({len(todo)} of {len(self.data)} cases)"
        refused = sum(tqdm(loader, total=len(todo), desc=desc, unit="case", disable=rank != 0))
        if refused:
            logger.warning(f"{refused} of {len(todo)} cases refused while filling the preprocessing cache")
        return len(todo)


class _CacheFiller(TorchDataset):
    """Case ``todo[j]`` of a `CTReportDataset` put into its cache; yields 1 when the case is refused, else 0."""

    def __init__(self, dataset: CTReportDataset, todo: list[int]) -> None:
        self.dataset, self.todo = dataset, todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, j: int) -> int:
        i = self.todo[j]
        try:
            self.dataset._cachecheck(self.dataset.data[i])
        except Exception as err:
            self.dataset._refuse(i, err)
            return 1
        return 0
