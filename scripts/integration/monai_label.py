"""MONAI Label: the bundle as a classification task (a CT in, the 18 CT-RATE finding scores out).

A MONAI Label app (monailabel 0.8.5, its own install: ``requirements-label.txt``) serves the bundle folder with::

    from scripts.integration.monai_label import finding_score_task
    task = finding_score_task(bundle_path, conf)     # a monailabel BundleInferTask

`FindingScoreConstants` points MONAI Label's `BundleInferTask` at ``configs/label_metadata.json`` (its first
output names the 18 findings; ``metadata.json``'s is the embedding) and at ``label_preprocessing`` and
``label_postprocessing`` of ``configs/inference.json``: inference's ``preprocessing`` after dropping MONAI Label's
``image_path`` string (MONAI 1.6.1's ``Spacingd`` updates every ``image_*`` item of a NIfTI input as a metadata
dict), and `scripts.integration.finding_scores.FindingScoresd` after the embedding. The network
is ``network_def`` with ``models/model.pt``, whose keys match exactly, so MONAI Label's non-strict load loads every
trained weight. A request holds ``image`` (a CT file or DICOM folder) and, optionally, ``seg`` (its
TotalSegmentator mask); without it the label channel is empty, as inference with ``--seg_source none``.
"""

from __future__ import annotations

from collections.abc import Sequence

from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask


class FindingScoreConstants(BundleConstants):
    """`BundleConstants` of the finding-score task (module docstring)."""

    def metadata_json(self) -> str:
        return "label_metadata.json"

    def key_preprocessing(self) -> Sequence[str]:
        return ["label_preprocessing"]

    def key_postprocessing(self) -> Sequence[str]:
        return ["label_postprocessing"]


def finding_score_task(path: str, conf: dict) -> BundleInferTask:
    """The classification `BundleInferTask` of the bundle at ``path``.

    The bundle's preprocessing loads ``image`` and an optional ``seg`` with MONAI's ``LoadImaged``
    (``extend_load_image=False``: MONAI Label's in-memory loader requires every key), and the scores are a vector,
    not an image to restore onto the input grid (``add_post_restore=False``).
    """
    return BundleInferTask(
        path,
        conf,
        const=FindingScoreConstants(),
        type="classification",
        extend_load_image=False,
        add_post_restore=False,
    )
