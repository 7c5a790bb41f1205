"""The inference workflow's dataset and engine: one case per iteration, refused cases recorded, never fatal."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.transforms import Transform
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DataLoader

from ..data import BadCaseError
from ..engines import _autocast_dtype
from ..errors import exception_chain
from ..evaluation import capturing_cls_attention

CASE_KEYS = ("case_id", "input_image", "input_mask", "input_kind")


def require_weights(model_file: str) -> str:
    """Check that the weights inference is about to load exist, before any case is read.

    Raises:
        FileNotFoundError: the file is missing; the message says how to get one.
    """
    if not Path(model_file).is_file():
        raise FileNotFoundError(
            f"{model_file} not found: train a model first (README: demo or training on your data), or point "
            "--ckpt_dir at the folder that holds model.pt"
        )
    return model_file


def require_cases_written(metrics: dict, output_dir: str) -> None:
    """After an inference run: fail (non-zero exit) when cases were read and every one was refused.

    A run with some good cases succeeds and lists the refused ones in ``refused.json``; a run that wrote
    nothing must not look like a success to the pipeline that started it.

    Args:
        metrics: the engine's ``state.metrics`` with ``cases_written`` and ``cases_refused`` (`RefusedCases`).
        output_dir: the run's output folder, for the message.

    Raises:
        BadCaseError: no case was written and at least one was refused.
    """
    refused = int(metrics.get("cases_refused", 0))
    if refused and not metrics.get("cases_written", 0):
        raise BadCaseError(
            f"every case was refused ({refused} of {refused}); nothing written: the reasons are in "
            f"{Path(output_dir) / 'refused.json'}"
        )


def refusal_reason(err: BaseException) -> str:
    """Why a case failed: the bundle's `BadCaseError` message in the exception chain, else the root cause."""
    chain = exception_chain(err)
    for e in chain:
        if isinstance(e, BadCaseError):
            return str(e)
    root = chain[-1]
    return f"{type(root).__name__}: {root}"


class CaseDataset(Dataset):
    """MONAI `Dataset` of inference cases whose failures become records instead of exceptions.

    An item that a discovery rule refused (``refusal`` from `find_cases`) or whose ``transform`` raises
    (a check's `BadCaseError`, an unreadable file) is returned as ``{"case_id", "input_image",
    "refused": reason}``, so one bad case never stops the run; the engine passes it on to the handlers,
    which list it in ``refused.json``.
    """

    def _transform(self, index: int):
        item = self.data[index]
        if item.get("refusal"):
            return {**{k: item.get(k) for k in CASE_KEYS}, "refused": item["refusal"]}
        try:
            return super()._transform(index)
        except Exception as err:  # noqa: B902 - every failure of one case is that case's refusal
            return {**{k: item.get(k) for k in CASE_KEYS}, "refused": refusal_reason(err)}


def first_case(batch: Sequence[dict]) -> dict:
    """Collate of a one-case batch: the item itself, its ``image`` given a batch axis ``(1, 2, D, H, W)``.

    Raises:
        ValueError: more than one case (run inference with ``batch_size`` 1).
    """
    if len(batch) != 1:
        raise ValueError(f"inference reads one case per iteration, got a batch of {len(batch)}")
    item = dict(batch[0])
    if "refused" not in item:
        image = item[Keys.IMAGE]
        item[Keys.IMAGE] = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image))[None]
    return item


class CTEmbeddingInferer(SupervisedEvaluator):
    """`SupervisedEvaluator` that embeds one CT per iteration for the inference outputs.

    ``network`` is ``network_def`` (`AnatomyAwareCTEncoder`); each batch is one case from `CaseDataset`
    through `first_case`. ``engine.state.output`` holds ``Keys.PRED``: the global embedding ``(1, E)``
    (what ``network_def(image)`` returns, float32), ``Keys.IMAGE`` the network input
    ``(1, 2, D, H, W)``, ``features`` (`AnatomyAwareCTEncoder.forward_features`, float32),
    ``cls_attention (1, N)`` (CLS attention over the patches in the last block, mean over heads) and
    ``case`` (the item's record: ids, files, grids); for a refused case only ``case`` with its
    ``refused`` reason, and the network does not run. The other arguments are the parent's.

    Args:
        autocast_dtype: ``"bfloat16"``, ``"float16"`` or ``None`` (float32).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: DataLoader,
        network: torch.nn.Module,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        val_handlers: Sequence | None = None,
        autocast_dtype: str | None = None,
    ) -> None:
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            postprocessing=postprocessing,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.autocast_dtype = _autocast_dtype(autocast_dtype)

    def _iteration(self, engine: CTEmbeddingInferer, batchdata: dict) -> dict:
        case = {k: v for k, v in batchdata.items() if k != Keys.IMAGE}
        if "refused" in batchdata:
            engine.state.output = {"case": case}
            return engine.state.output
        image = batchdata[Keys.IMAGE].to(engine.state.device, non_blocking=engine.non_blocking)
        encoder = engine.network
        device_type = torch.device(engine.state.device).type
        with capturing_cls_attention(encoder) as cls_row, engine.mode(encoder), torch.autocast(
            device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            features = engine.inferer(image, _ForwardFeatures(encoder))
            cls_attention = cls_row()
        features = {k: v.float() if v.is_floating_point() else v for k, v in features.items()}
        engine.state.output = {
            Keys.IMAGE: image,
            Keys.PRED: features["global_embedding"],
            "features": features,
            "cls_attention": cls_attention.float(),
            "case": case,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class _ForwardFeatures(torch.nn.Module):
    """Calls ``forward_features`` of the encoder, so a MONAI inferer returns the whole feature dict."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encoder.forward_features(image)
