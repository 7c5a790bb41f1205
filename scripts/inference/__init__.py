"""Inference on new CTs (configs/inference.json): case discovery, DICOM checks, the engine and its writers."""

from .cases import find_cases
from .dicom import CheckDicomSeriesd, check_dicom_series
from .engine import CaseDataset, CTEmbeddingInferer, first_case, refusal_reason, require_cases_written, require_weights
from .segmentation import TotalSegmentatord, check_seg_source
from .transforms import CentreCropNoticed, RecordInputGridd
from .writers import CaseWriter, RefusedCases, map_on_input_grid
