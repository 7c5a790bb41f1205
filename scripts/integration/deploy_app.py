"""MONAI Deploy application: a DICOM CT series in, the bundle's global embedding out.

``DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator -> DICOMSeriesToVolumeOperator ->
MonaiBundleInferenceOperator (model.ts with its embedded configs) -> EmbeddingWriterOperator``. The bundle
operator runs ``preprocessing``, ``inferer`` and ``postprocessing`` of the configs that `monai.bundle ckpt_export`
put into ``model.ts`` (``extra/inference.json``, then any override exported with it, e.g. ``extra/demo.json``); it
feeds the CT alone (the label channel is empty, as inference with ``--seg_source none``) and returns ``pred``, the
L2-normalised global embedding ``(E,)``, written as ``OUT/global_embedding.npy`` (float32).

Run with the Deploy install (``pip install -r requirements-deploy.txt``), from the bundle root::

    python -m scripts.integration.deploy_app -i DICOM_SERIES_FOLDER -o OUT -m models/model.ts
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)

EMBEDDING_FILE = "global_embedding.npy"
SERIES_NUMBER = 0x00200011


class _EmptySeriesNumberAbsent:
    """A SOP instance whose empty SeriesNumber reads as absent (``KeyError``), as DICOM means it."""

    def __init__(self, sop_instance):
        self._sop = sop_instance

    def _empty(self, tag) -> bool:
        element = self._sop[tag] if tag in self._sop else None
        return element is not None and element.tag == SERIES_NUMBER and element.value in (None, "")

    def __contains__(self, tag) -> bool:
        return tag in self._sop and not self._empty(tag)

    def __getitem__(self, tag):
        if self._empty(tag):
            raise KeyError(tag)
        return self._sop[tag]


class SeriesLoaderOperator(DICOMDataLoaderOperator):
    """`DICOMDataLoaderOperator` that accepts an empty SeriesNumber.

    SeriesNumber is a type 2 attribute (present, possibly empty); the SDK 4.0.0 loader calls ``int()`` on it and
    drops every instance of such a series (the bundled de-identified sample has one).
    """

    def populate_series_attributes(self, series, sop_instance):
        super().populate_series_attributes(series, _EmptySeriesNumberAbsent(sop_instance))


def embedded_config_names(model_ts: str | Path) -> list[str]:
    """The configs `ckpt_export` stored in ``model_ts`` (``extra/<name>.json`` but metadata): ``inference`` first,
    then the overrides exported with it, sorted.

    Raises:
        ValueError: ``model_ts`` holds no ``extra/inference.json``.
    """
    with zipfile.ZipFile(model_ts) as archive:
        names = {Path(n).stem for n in archive.namelist() if Path(n).parent.name == "extra" and n.endswith(".json")}
    if "inference" not in names:
        raise ValueError(f"{model_ts} has no extra/inference.json: export it with monai.bundle ckpt_export")
    return ["inference"] + sorted(names - {"inference", "metadata"})


class EmbeddingWriterOperator(Operator):
    """Writes the received embedding ``(E,)`` to ``output_folder/global_embedding.npy``."""

    def __init__(self, fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("embedding")

    def compute(self, op_input, op_output, context):
        embedding = np.asarray(op_input.receive("embedding"), dtype=np.float32)
        self.output_folder.mkdir(parents=True, exist_ok=True)
        np.save(self.output_folder / EMBEDDING_FILE, embedding)
        logging.info(f"{self.output_folder / EMBEDDING_FILE}: embedding {embedding.shape}")


class CTEmbeddingApp(Application):
    """DICOM series -> global embedding of the bundle's ``model.ts`` (module docstring)."""

    def compose(self):
        context = Application.init_app_context(self.argv)
        model_ts = Path(context.model_path)
        model_ts = model_ts if model_ts.is_file() else model_ts / "model.ts"
        loader = SeriesLoaderOperator(
            self, CountCondition(self, 1), input_folder=Path(context.input_path), name="dicom_loader"
        )
        selector = DICOMSeriesSelectorOperator(self, name="series_selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        bundle = MonaiBundleInferenceOperator(
            self,
            app_context=context,
            bundle_path=model_ts,
            bundle_config_names=BundleConfigNames(config_names=embedded_config_names(model_ts)),
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", np.ndarray, IOType.IN_MEMORY)],
            name="bundle_inference",
        )
        writer = EmbeddingWriterOperator(self, output_folder=Path(context.output_path), name="embedding_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, bundle, {("image", "image")})
        self.add_flow(bundle, writer, {("pred", "embedding")})


if __name__ == "__main__":
    CTEmbeddingApp().run()
