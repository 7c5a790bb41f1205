"""Ignite workflows of the bundle: the contrastive trainer and evaluator, built on `monai.engines`."""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Sequence

import ignite.distributed as idist
import torch
from ignite.metrics import Metric
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.handlers import MLFlowHandler
from monai.inferers import Inferer
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DataLoader

from .losses import gather_keys, gather_with_grad, pair_keys, positive_groups, region_text_inputs, step_inputs

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# parameters that are tables or scales rather than weights: never weight-decayed
NO_DECAY_NAMES = ("pos_z", "pos_y", "pos_x", "cls_token", "region_embedding", "slice_bias", "log_logit_scale")


def parameter_groups(model: torch.nn.Module, lr: float, text_lr: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups of a `CTReportCLIP`.

    The pretrained text transformer (``text_encoder.model``) learns at ``text_lr``, everything else at
    ``lr``. Weight decay applies to weight matrices and kernels only: not to biases, norms, positional
    tables, the CLS token, region embeddings, the slice-bias table or the logit scale. Frozen parameters
    are left out.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_text = name.startswith("text_encoder.model.")
        decay = param.ndim >= 2 and not name.endswith(NO_DECAY_NAMES)
        groups.setdefault((is_text, decay), []).append(param)
    return [
        {"params": params, "lr": text_lr if is_text else lr, "weight_decay": weight_decay if decay else 0.0}
        for (is_text, decay), params in groups.items()
    ]


def lower_is_better(current: float, best: float) -> bool:
    """``metric_cmp_fn`` for a non-negative metric where lower is better (MONAI starts ``best`` at -1)."""
    return best < 0 or current < best


def _autocast_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype must be one of {tuple(AUTOCAST_DTYPES)} or None, got {name!r}")
    return AUTOCAST_DTYPES[name]


def _contrastive_batch(
    batchdata: dict, device: torch.device, non_blocking: bool, image_transform: Callable | None = None
) -> tuple:
    """``(image (B, 2, D, H, W), texts, keys (B, 2))`` of a collated batch with image, text and study.

    The packed image moves to ``device`` as it comes from the data loader (int16 HU and label ids from
    ``pack_transforms``); ``image_transform`` (`scripts.data.WindowPackedCT`) then makes the float32
    network input there.

    Raises:
        ValueError: no batch; an integer image and no ``image_transform`` to window it.
    """
    if batchdata is None:
        raise ValueError("Must provide batch data for current iteration.")
    image = batchdata[Keys.IMAGE]
    image = image.as_tensor() if hasattr(image, "as_tensor") else image
    image = image.to(device, non_blocking=non_blocking)
    if image_transform is not None:
        image = image_transform(image)
    elif not image.is_floating_point():
        raise ValueError(
            f"the batch image is {image.dtype} (HU and label ids from pack_transforms) and the engine has no "
            "image_transform to window it: pass image_transform=scripts.data.WindowPackedCT(hu_window)"
        )
    texts = list(batchdata["text"])
    return image, texts, pair_keys(batchdata["study"], texts)


class ContrastiveTrainer(SupervisedTrainer):
    """`SupervisedTrainer` whose iteration is one contrastive step on (CT, report) pairs.

    ``network`` is a `CTReportCLIP` (DDP-wrapped or not); each batch carries ``image`` (packed CT + label
    map), ``text``, ``study``, and for the multi-level terms ``region_text``, ``region_normal``,
    ``cot_steps`` and ``labels``. ``loss_function`` is a `MultiLevelLoss`: only the inputs of its enabled
    terms are computed. The step runs the model once (image, report, region sentences and reasoning steps
    through one text-tower call), gathers the global and region embeddings across DDP ranks with
    gradients (negatives are global; pairs of one study or one identical report are positives of each
    other), and keeps the step, local, segmentation and finding terms per rank. ``engine.state.output``
    holds ``Keys.LOSS``, the detached ``loss_terms`` and embeddings; the parent's `IterationEvents` fire
    as usual. The other arguments are the parent's.

    A step whose loss or global gradient norm is not finite (bf16 overflow, a broken case) is skipped:
    no optimizer or scaler step, a warning naming the batch's cases, and the count in
    ``engine.state.nonfinite_steps_skipped`` (it travels in the resume file). Under DDP every rank skips
    the same steps. With float16 the gradient scaler's own overflow skips are not counted.

    Args:
        autocast_dtype: ``"bfloat16"``, ``"float16"`` (with a gradient scaler) or ``None`` (float32).
        max_grad_norm: clip the global gradient norm to this value; ``None`` disables clipping.
        image_transform: applied to the packed image on ``device`` (`scripts.data.WindowPackedCT`, the HU
            window); ``None`` when the loader already yields the float network input.
        train_handlers: the parent's; an `MLFlowHandler` among them is fitted by `fit_mlflow_handlers`.
        max_consecutive_nonfinite_steps: stop the run when this many steps in a row are skipped.

    Raises:
        ValueError: unknown ``autocast_dtype``; a training loader that yields no batch (fewer items than
            ``batch_size`` with ``drop_last``); a batch that is ``None``.
        FloatingPointError: more than ``max_consecutive_nonfinite_steps`` skipped steps in a row (the
            parameters are still those of the last finite step).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        inferer: Inferer | None = None,
        train_handlers: Sequence | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable | None = None,
        optim_set_to_none: bool = True,
        autocast_dtype: str | None = None,
        max_grad_norm: float | None = None,
        image_transform: Callable | None = None,
        max_consecutive_nonfinite_steps: int = 10,
    ) -> None:
        device = torch.device(device)
        if isinstance(train_data_loader, DataLoader) and len(train_data_loader) == 0:
            raise ValueError(
                f"the training data loader yields no batch: {len(train_data_loader.sampler)} items for this process "
                f"(of {len(train_data_loader.dataset)} in the training list) with batch_size "
                f"{train_data_loader.batch_size} and drop_last={train_data_loader.drop_last}; add data or lower batch_size"
            )
        fit_mlflow_handlers(train_handlers, output_transform=logged_losses)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            inferer=inferer,
            train_handlers=train_handlers,
            key_train_metric=key_train_metric,
            metric_cmp_fn=metric_cmp_fn or default_metric_cmp_fn,
            decollate=False,
            optim_set_to_none=optim_set_to_none,
        )
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        self.max_grad_norm = max_grad_norm
        self.image_transform = image_transform
        self.grad_scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype == torch.float16)
        self.max_consecutive_nonfinite_steps = max_consecutive_nonfinite_steps
        self.state.nonfinite_steps_skipped = 0
        self.state.last_finished_iteration = 0  # the last iteration whose optimizer step was taken (or skipped)
        self._nonfinite_in_a_row = 0

    def _iteration(self, engine: ContrastiveTrainer, batchdata: dict) -> dict:
        image, texts, keys = _contrastive_batch(
            batchdata, engine.state.device, engine.non_blocking, engine.image_transform
        )
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: None}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        enabled = engine.loss_function.enabled
        num_regions = _unwrap(engine.network).image_encoder.num_regions
        region_texts, has_text, region_keys = (
            region_text_inputs(batchdata["region_text"]) if "region" in enabled else ([], None, None)
        )
        steps, step_item, step_regions = (
            step_inputs(batchdata["cot_steps"], num_regions) if "step" in enabled else ([], None, None)
        )
        device, device_type = image.device, torch.device(engine.state.device).type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = engine.inferer(image, engine.network, texts, region_texts + steps, "local" in enabled)
            features = out["image_features"]
            engine.state.output[Keys.PRED] = {
                "image_embedding": features["global_embedding"].detach(),
                "text_embedding": out["text_embedding"].detach(),
            }
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            extra = out.get("extra_text_embedding")
            inputs = {
                "logit_scale": out["logit_scale"],
                "image_emb": gather_with_grad(features["global_embedding"]),
                "text_emb": gather_with_grad(out["text_embedding"]),
                "group_ids": positive_groups(gather_keys(keys.to(device))),
            }
            if "region" in enabled:
                region_text_emb = features["region_embedding"].new_zeros(
                    features["region_embedding"].shape
                )  # (B, R, E)
                if region_texts:  # scatter back in the row-major (b, r) order of region_text_inputs
                    region_text_emb[has_text.to(device)] = extra[: len(region_texts)].to(region_text_emb.dtype)
                valid = features["region_present"] & has_text.to(device)
                normal = torch.as_tensor(batchdata["region_normal"]).bool().to(device)
                inputs.update(
                    region_emb=gather_with_grad(features["region_embedding"]),
                    region_text_emb=gather_with_grad(region_text_emb),
                    region_valid=gather_keys(valid.long()).bool(),
                    region_text_keys=gather_keys(region_keys.to(device)),
                    region_is_normal=gather_keys(normal.long()).bool(),
                )
            if "step" in enabled:  # steps against the regions of their own CT: no gather needed
                inputs.update(
                    step_emb=extra[len(region_texts) :] if steps else _no_steps(features),
                    step_item=step_item.to(device),
                    step_regions=step_regions.to(device),
                    step_region_emb=features["region_embedding"],
                    step_region_present=features["region_present"],
                )
            if "local" in enabled:  # patch-token alignment within this rank's batch
                inputs.update(
                    local_emb=features["local_embedding"],
                    token_emb=out["token_embedding"],
                    token_mask=out["token_mask"],
                    local_group_ids=positive_groups(keys.to(device)),  # this rank's items only
                )
            if "segmentation" in enabled:
                inputs.update(
                    segmentation_logits=features["segmentation_logits"],
                    patch_to_region=features["patch_to_region"],
                    background_fraction=features["background_fraction"],
                )
            if "finding" in enabled:
                inputs.update(finding_logits=features["finding_logits"], finding_labels=batchdata["labels"].to(device))
            terms = engine.loss_function(**inputs)
        loss = terms["loss"]
        engine.state.output[Keys.LOSS] = loss
        engine.state.output["loss_terms"] = {name: value.detach() for name, value in terms.items() if name != "loss"}
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self.grad_scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        self.grad_scaler.unscale_(engine.optimizer)  # a no-op without float16
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in engine.network.parameters() if p.grad is not None]
            )
        # float16: the scaler skips overflowing gradients itself; a non-finite loss is a bad step in any mode
        bad = ~torch.isfinite(loss.detach()) | (~torch.isfinite(grad_norm) & (not self.grad_scaler.is_enabled()))
        if _on_any_rank(bad):
            self._skip_step(engine, batchdata, loss, grad_norm)
        else:
            self._nonfinite_in_a_row = 0
            self.grad_scaler.step(engine.optimizer)
            self.grad_scaler.update()
        engine.state.last_finished_iteration = engine.state.iteration
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _skip_step(self, engine: ContrastiveTrainer, batchdata: dict, loss: torch.Tensor, grad_norm) -> None:
        """Leave the parameters at the last finite step; count, name the cases, stop after too many in a row."""
        engine.optimizer.zero_grad(set_to_none=True)
        if self.grad_scaler.is_enabled():
            self.grad_scaler.update()  # lowers the scale after the overflow that unscale_ recorded
        engine.state.nonfinite_steps_skipped += 1
        self._nonfinite_in_a_row += 1
        cases = list(batchdata.get("case_id", batchdata.get("case_index", [])))
        message = (
            f"iteration {engine.state.iteration}: loss {float(loss.detach()):.4g}, gradient norm "
            f"{float(grad_norm):.4g} on this rank; step skipped ({engine.state.nonfinite_steps_skipped} so far, "
            f"{self._nonfinite_in_a_row} in a row); cases of this rank's batch: {cases}"
        )
        if self._nonfinite_in_a_row > self.max_consecutive_nonfinite_steps:
            raise FloatingPointError(
                f"{message}. More than max_consecutive_nonfinite_steps={self.max_consecutive_nonfinite_steps} "
                "skipped steps in a row: stopping (the parameters are those of the last finite step)"
            )
        engine.logger.warning(message)


def _on_any_rank(flag: torch.Tensor) -> bool:
    """``flag`` (a bool tensor) true on any DDP rank: every rank then takes the same branch."""
    return bool(idist.all_reduce(flag.to(torch.int32), op="MAX"))  # the flag itself outside a process group


def _no_steps(features: dict) -> torch.Tensor:
    """An empty ``(0, E)`` step embedding when a batch has no usable reasoning step (the term is then 0)."""
    return features["global_embedding"].new_zeros(0, features["global_embedding"].shape[-1])


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The `CTReportCLIP` inside a DDP wrapper (or the network itself)."""
    return getattr(network, "module", network)


def mlflow_metric_name(name: str) -> str:
    """``name`` as MLflow accepts it: ``@`` becomes ``_at_`` (``val_recall@1`` -> ``val_recall_at_1``), any other
    character outside letters, digits and ``_-. :/`` becomes ``_``."""
    return re.sub(r"[^0-9A-Za-z_\-. :/]", "_", name.replace("@", "_at_"))


def fit_mlflow_handlers(handlers: Sequence | None, output_transform: Callable | None = None) -> None:
    """Fit MONAI's built-in MLflow handlers (``--tracking mlflow``) to this bundle's engines, in place.

    MONAI's settings log the iteration loss through ``from_engine(['loss'], first=True)``, which needs the decollated
    list of per-item outputs that these engines (one batch dict, ``decollate=False``) do not make: an `MLFlowHandler`
    among ``handlers`` gets ``output_transform`` instead when one is given. Its epoch log takes the engine's scalar
    metrics under names MLflow accepts (`mlflow_metric_name`; MLflow refuses ``val_recall@1``). Other handlers are
    left alone.
    """
    for handler in handlers or ():
        if isinstance(handler, MLFlowHandler):
            if output_transform is not None:
                handler.output_transform = output_transform
            handler.epoch_logger = functools.partial(_log_epoch_metrics, handler)


def _log_epoch_metrics(handler: MLFlowHandler, engine) -> None:
    from mlflow.entities import Metric

    step = handler.global_epoch_transform(engine.state.epoch)
    stamp = int(time.time() * 1000)
    metrics = [
        Metric(mlflow_metric_name(name), float(value), stamp, step)
        for name, value in engine.state.metrics.items()
        if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    ]
    if metrics:
        handler.client.log_batch(run_id=handler.cur_run.info.run_id, metrics=metrics)


def logged_losses(output: dict) -> dict[str, torch.Tensor]:
    """What the stats handlers log per iteration: the total ``loss`` and, with several terms, each term."""
    terms = output.get("loss_terms", {})
    return {"loss": output[Keys.LOSS], **({f"loss_{k}": v for k, v in terms.items()} if len(terms) > 1 else {})}


class ContrastiveEvaluator(SupervisedEvaluator):
    """`SupervisedEvaluator` that embeds (CT, report) pairs for retrieval metrics.

    ``engine.state.output`` holds ``image_embedding (B, E)``, ``text_embedding (B, E)``, ``keys``
    ``(B, 2)`` (study and report keys, see `scripts.losses.pair_keys`) and ``case_index (B,)``, the input
    of `scripts.metrics.RetrievalRecall` (which counts each case once under DDP). The network runs in eval mode
    without gradients. A non-finite embedding stops the evaluation (`FloatingPointError` naming the cases),
    so no key-metric saver ever sees a metric of a non-finite state. The other arguments are the parent's.

    Args:
        autocast_dtype: ``"bfloat16"``, ``"float16"`` or ``None`` (float32).
        image_transform: as `ContrastiveTrainer`'s.
        val_handlers: the parent's; an `MLFlowHandler` among them is fitted by `fit_mlflow_handlers`.
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: DataLoader,
        network: torch.nn.Module,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        inferer: Inferer | None = None,
        key_val_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        val_handlers: Sequence | None = None,
        autocast_dtype: str | None = None,
        image_transform: Callable | None = None,
    ) -> None:
        fit_mlflow_handlers(val_handlers)
        super().__init__(
            device=torch.device(device),
            val_data_loader=val_data_loader,
            network=network,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            inferer=inferer,
            key_val_metric=key_val_metric,
            additional_metrics=additional_metrics,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.autocast_dtype = _autocast_dtype(autocast_dtype)
        self.image_transform = image_transform

    def _iteration(self, engine: ContrastiveEvaluator, batchdata: dict) -> dict:
        image, texts, keys = _contrastive_batch(
            batchdata, engine.state.device, engine.non_blocking, engine.image_transform
        )
        device_type = torch.device(engine.state.device).type
        with engine.mode(engine.network):
            with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                out = engine.inferer(image, engine.network, texts)
        image_embedding, text_embedding = (
            out["image_features"]["global_embedding"].float(),
            out["text_embedding"].float(),
        )
        finite = torch.isfinite(image_embedding).all(-1) & torch.isfinite(text_embedding).all(-1)  # (B,)
        if not finite.all():
            cases = list(batchdata.get("case_id", batchdata["case_index"]))
            raise FloatingPointError(
                f"validation embeddings are not finite for cases {[c for c, ok in zip(cases, finite) if not ok]}: the "
                "network state or those inputs are broken; stopping before anything is saved as the best model"
            )
        engine.state.output = {
            Keys.IMAGE: image,
            "image_embedding": image_embedding,
            "text_embedding": text_embedding,
            "keys": keys,
            "case_index": torch.as_tensor(batchdata["case_index"]).long(),
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
