"""Data side of the bundle: datalists, report text and the bundle's own transforms."""

from .datalist import load_datalist
from .reports import assemble_report, split_sentences
from .transforms import CheckSameGridd, ToSliceFirstd
