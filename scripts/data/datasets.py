"""Datasets and collation for CT-report pairs: cached preprocessing that survives bad cases."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from monai.data import PersistentDataset, list_data_collate

from .transforms import BadCaseError

logger = logging.getLogger(__name__)

# per-item fields whose length varies between items: kept as lists, one entry per item
LIST_KEYS = ("region_text", "cot_steps", "region_sentences")


def collate_reports(batch: Sequence[dict]) -> dict:
    """Collate CT-report items: tensors and strings as MONAI's `list_data_collate` does, and the
    variable-length fields of `LIST_KEYS` as plain lists (``batch["cot_steps"][i]`` is item ``i``'s)."""
    lists = {k: [item[k] for item in batch] for k in LIST_KEYS if k in batch[0]}
    collated = list_data_collate([{k: v for k, v in item.items() if k not in lists} for item in batch])
    collated.update(lists)
    return collated


def _bad_case(err: BaseException) -> BadCaseError | None:
    """The `BadCaseError` behind an exception (MONAI wraps transform errors in RuntimeError), if any."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BadCaseError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class CTReportDataset(PersistentDataset):
    """`PersistentDataset` whose deterministic preprocessing is cached on disk, and which can skip bad cases.

    With ``skip_bad_cases=True`` a case refused by a check (`BadCaseError`: mask on another grid, CT not
    in HU, too few slices) is logged once with its file name and replaced by the next good case, so
    one broken volume never stops a long run and is never trained on. Other errors still raise.
    ``bad_cases`` holds the refused indices and messages of this process.

    The other arguments are `PersistentDataset`'s: set ``hash_transform`` (e.g.
    ``monai.data.utils.pickle_hashing``) so a changed preprocessing never reuses a stale cache.

    Raises:
        BadCaseError: a refused case, when ``skip_bad_cases=False``.
        RuntimeError: every case was refused.
    """

    def __init__(
        self,
        data: Sequence,
        transform,
        cache_dir: str | None,
        hash_transform=None,
        skip_bad_cases: bool = True,
    ) -> None:
        super().__init__(data=data, transform=transform, cache_dir=cache_dir, hash_transform=hash_transform)
        self.skip_bad_cases = skip_bad_cases
        self.bad_cases: dict[int, str] = {}

    def _transform(self, index: int):
        for offset in range(len(self.data)):
            i = (index + offset) % len(self.data)
            if i in self.bad_cases:
                continue
            try:
                return super()._transform(i)
            except Exception as err:
                bad = _bad_case(err)
                if bad is None:
                    raise
                if not self.skip_bad_cases:
                    raise bad from err  # the check's own message, not MONAI's wrapper
                self.bad_cases[i] = str(bad)
                logger.warning(f"skipping case {i} ({len(self.bad_cases)} skipped so far): {bad}")
        raise RuntimeError(f"all {len(self.data)} cases were refused; first: {next(iter(self.bad_cases.values()))}")
