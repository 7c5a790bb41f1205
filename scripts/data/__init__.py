"""Data side of the bundle: datalists (MONAI JSON, CT-RATE, OmniAbnorm-CT), report text, transforms, datasets."""

from .cache_format import read_cache_file
from .ctrate import FINDINGS, build_ctrate_datalist, parse_volume_name
from .datalist import load_datalist, load_pairs
from .datasets import CTReportDataset, collate_reports
from .geometry import ResolveGeometryd
from .label_maps import CheckLabelIdsd, CheckLabelPlausibilityd, read_label_table
from .lexicon import RegionLexicon
from .omniabnorm import load_omniabnorm
from .reports import assemble_report, fit_report, split_cot_steps, split_sentences
from .transforms import (
    BadCaseError,
    ChainOfThoughtd,
    CheckMinSlicesd,
    CheckSameGridd,
    EndOfCache,
    FillMissingLabelMapd,
    RegionSentencesd,
    RescaleToHUd,
    ToSliceFirstd,
    WindowPackedCT,
)
