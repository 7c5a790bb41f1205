"""The evaluation workflow: an Ignite evaluator that embeds each case, and a handler that writes the report.

`CTReportEvaluator` runs the CLIP model on every (CT, report) case and leaves per-case rows in
``engine.state.output``; `EvaluationReport` collects them (correct under DDP: `CaseAccumulator` gathers
uneven shards and drops `DistributedSampler` padding), then writes on rank 0:

- ``metrics.json``: retrieval (`retrieval_metrics`), zero-shot classification over the 18 CT-RATE
  findings (`classification_metrics`, CT-CLIP prompts), the finding head's scores when the model has
  one, region grounding (`top_regions_per_finding`, `region_auroc`) and chain-of-thought alignment
  (`cot_alignment`); a value the data cannot define is ``null`` with its reason, and no number is
  infinite or NaN (`replace_non_finite`);
- ``per_case.csv``: ranks of each case's report and image, zero-shot probabilities and labels;
- figures: ROC curves, recall vs K, the slice-distance bias of the first and last block (PNG, also to
  TensorBoard), and for the first cases text-to-patch similarity and CLS attention maps as NIfTI on the
  original CT's grid (shape and affine of the CT file) with PNG overlays through the peak.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.transforms import LoadImage, MapTransform, ResampleToMatch
from monai.utils.enums import CommonKeys as Keys

from . import metrics as M
from . import visualize
from .data.ctrate import FINDINGS
from .engines import ContrastiveEvaluator, _contrastive_batch
from .networks.slice_attention import slice_distance_index
from .zero_shot import compute_prompt_embeddings

logger = logging.getLogger(__name__)


def load_prompt_templates(path: str | Path) -> list[tuple[str, str]]:
    """The ``(present, absent)`` zero-shot prompt pairs of a JSON file (``{"templates": [[p, a], ...]}``).

    Raises:
        ValueError: no pair, a pair that is not two strings, or a template without ``{finding}``; the
            message names the file.
    """
    templates = json.loads(Path(path).read_text()).get("templates") or []
    for pair in templates:
        if len(pair) != 2 or not all(isinstance(t, str) and "{finding}" in t for t in pair):
            raise ValueError(f"{path}: each template must be two strings with '{{finding}}', got {pair!r}")
    if not templates:
        raise ValueError(f"{path}: no templates")
    return [tuple(pair) for pair in templates]


class RecordGridd(MapTransform):
    """Keep the RAS affine and shape of the cropped CT, before it is padded and permuted for the network.

    Writes ``grid_affine`` ``(4, 4)`` float64 and ``grid_shape`` ``(3,)`` (x, y, z voxels): with the
    network's input size they place every patch in world coordinates, so maps go back onto the CT.
    """

    def __init__(self, keys: str = "image") -> None:
        super().__init__(keys)

    def __call__(self, data):
        d = dict(data)
        image = d[self.keys[0]]
        d["grid_affine"] = torch.as_tensor(image.affine, dtype=torch.float64)
        d["grid_shape"] = torch.tensor(image.shape[1:], dtype=torch.long)
        return d


def network_grid_affine(grid_affine: torch.Tensor, grid_shape: Sequence[int], input_size: Sequence[int]) -> np.ndarray:
    """RAS affine of the padded network input, in ``(X, Y, Z)`` voxel order.

    The cropped CT (``grid_shape`` (x, y, z), affine ``grid_affine``) is padded symmetrically to
    ``input_size`` (D, H, W) = (z, y, x) sides; MONAI puts ``(target - size) // 2`` voxels before the
    content, so network voxel ``i`` is crop voxel ``i - before``.
    """
    target = np.asarray(list(input_size)[::-1], dtype=np.float64)  # (x, y, z)
    before = np.floor((target - np.asarray(grid_shape, dtype=np.float64)) / 2)
    shift = np.eye(4)
    shift[:3, 3] = -before
    return np.asarray(grid_affine, dtype=np.float64) @ shift


class CTReportEvaluator(ContrastiveEvaluator):
    """`SupervisedEvaluator` that embeds CTs, reports and reasoning steps for the evaluation report.

    ``network`` is the `CTReportCLIP` (not DDP-wrapped). Per iteration ``engine.state.output`` holds, for
    the ``B`` cases of the batch: ``case_index (B,)``, ``keys (B, 2)``, ``labels (B, 18)``, the image
    features of `AnatomyAwareCTEncoder.forward_features` (embeddings, ``region_present``,
    ``patch_to_region``, ``patch_positions``, ``finding_logits`` when built), ``text_embedding (B, E)``,
    ``region_mention (B, R)`` (the report has a sentence on the region that is not normal),
    ``step_embedding (S, E)``, ``step_key (S, 2)`` = (case index, step index), ``step_tags (S, R)``,
    ``grid_affine``, ``grid_shape``, ``texts``; and ``cls_attention (B, N)`` (last block, mean over heads).
    The arguments are `ContrastiveEvaluator`'s.
    """

    def _iteration(self, engine: CTReportEvaluator, batchdata: dict) -> dict:
        image, texts, keys = _contrastive_batch(
            batchdata, engine.state.device, engine.non_blocking, engine.image_transform
        )
        model = engine.network
        steps = [(i, j, step) for i, item in enumerate(batchdata["cot_steps"]) for j, step in enumerate(item)]
        num_regions = model.image_encoder.num_regions
        device_type = torch.device(engine.state.device).type
        with capturing_cls_attention(model.image_encoder) as cls_row, engine.mode(model), torch.autocast(
            device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            features = model.image_encoder.forward_features(image)
            text_embedding = model.text_encoder(texts)
            step_embedding = model.text_encoder([s["text"] for _, _, s in steps]) if steps else None
            cls_attention = cls_row()
        case_index = torch.as_tensor(batchdata["case_index"]).long()
        region_text = batchdata.get("region_text") or [[""] * num_regions for _ in texts]
        normal = batchdata.get("region_normal", torch.zeros(len(texts), num_regions, dtype=torch.bool))
        mention = torch.tensor([[bool(t) for t in item] for item in region_text]) & ~torch.as_tensor(normal).bool()
        step_tags = torch.zeros(len(steps), num_regions, dtype=torch.bool)
        for row, (_, _, step) in enumerate(steps):
            step_tags[row, step["regions"]] = True
        engine.state.output = {
            Keys.IMAGE: image,
            "case_index": case_index,
            "keys": keys,
            "labels": torch.as_tensor(batchdata["labels"]).double(),
            "features": {k: v.float() if v.is_floating_point() else v for k, v in features.items()},
            "text_embedding": text_embedding.float(),
            "region_mention": mention,
            "step_key": torch.tensor([[case_index[i], j] for i, j, _ in steps], dtype=torch.long).reshape(-1, 2),
            "step_embedding": step_embedding.float() if step_embedding is not None else None,
            "step_tags": step_tags,
            "cls_attention": cls_attention.float(),
            "grid_affine": batchdata.get("grid_affine"),
            "grid_shape": batchdata.get("grid_shape"),
            "texts": texts,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def cls_attention_row(attn, x: torch.Tensor, token_slices: torch.Tensor) -> torch.Tensor:
    """Attention of the CLS token over the patches in one `SliceAwareSelfAttention` layer, mean over heads.

    Computed from the layer's (normed) input ``x (B, 1 + N, C)`` for the CLS query only, with the
    same slice bias as the layer, so it costs ``O(N)`` and never forms the ``N x N`` matrix.

    Returns:
        ``(B, N)``, each row summing to ``1 - (attention of CLS to itself)``.
    """
    b, t, c = x.shape
    qkv = attn.qkv(x).view(b, t, 3, attn.num_heads, attn.head_dim)  # (B, T, 3, nh, hd)
    q = qkv[:, :1, 0].transpose(1, 2)  # (B, nh, 1, hd)
    k = qkv[:, :, 1].transpose(1, 2)  # (B, nh, T, hd)
    logits = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (B, nh, 1, T)
    if attn.slice_bias is not None:
        index = slice_distance_index(token_slices, attn.num_slice_buckets)[:1]  # (1, T): CLS row, all 0
        logits = logits + attn.slice_bias[:, index].to(logits.dtype)[None]
    return logits.softmax(-1)[:, :, 0, 1:].mean(1)  # (B, N)


@contextmanager
def capturing_cls_attention(encoder: torch.nn.Module) -> Iterator[Callable[[], torch.Tensor]]:
    """Record the input of the encoder's last attention layer while the block runs.

    Yields a function that returns `cls_attention_row` ``(B, N)`` of the latest forward pass; the hook is
    removed on leaving the block, also when the forward raises.
    """
    last_attn = encoder.blocks[-1].attn
    captured = {}
    hook = last_attn.register_forward_hook(lambda m, args, out: captured.update(x=args[0], slices=args[1]))
    try:
        yield lambda: cls_attention_row(last_attn, captured["x"], captured["slices"])
    finally:
        hook.remove()


def _to_cpu(gathered: tuple) -> tuple:
    key, rows = gathered
    return key.cpu(), {name: value.cpu() for name, value in rows.items()}


def save_map_on_ct(
    patch_map: torch.Tensor,
    grid_affine: torch.Tensor,
    grid_shape: torch.Tensor,
    input_size: Sequence[int],
    network_ct: torch.Tensor,
    ct_file: str,
    stem: Path,
) -> Path:
    """Write a patch-grid map as NIfTI on the original CT's grid (its shape and affine) and as a PNG.

    The map ``(Z, Y, X)`` is upsampled to the network input (`visualize.patch_map_to_grid`), placed in
    world coordinates with the input's RAS affine (`network_grid_affine`), resampled onto the CT file's
    own grid with MONAI's `ResampleToMatch` (trilinear, zero outside the input), and written with the
    file's affine, so 3D Slicer or MONAI Label overlays it on that CT. The PNG overlays the map on the
    network input through the map's peak (`visualize.save_overlay_png`).

    Args:
        patch_map: ``(Z, Y, X)`` values on the patch grid.
        grid_affine, grid_shape: from `RecordGridd` (RAS crop before padding).
        input_size: network input ``(D, H, W)``.
        network_ct: ``(D, H, W)`` windowed CT channel of the network input.
        ct_file: the CT the case was loaded from.
        stem: output path without suffix (``.nii.gz`` and ``.png`` are added).

    Returns:
        the NIfTI path.
    """
    ct_xyz = network_ct.detach().float().cpu().permute(2, 1, 0)  # (D, H, W) -> (X, Y, Z)
    affine = network_grid_affine(grid_affine, [int(s) for s in grid_shape], input_size)
    volume = torch.as_tensor(visualize.patch_map_to_grid(patch_map, ct_xyz.shape))  # (X, Y, Z)
    reference = LoadImage(image_only=True, ensure_channel_first=True)(ct_file)
    on_ct = ResampleToMatch(mode="bilinear", padding_mode="zeros")(
        MetaTensor(volume[None], affine=torch.as_tensor(affine)), reference
    )
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.parent / f"{stem.name}.nii.gz"
    nib.save(nib.Nifti1Image(on_ct[0].numpy().astype(np.float32), np.asarray(reference.affine, dtype=np.float64)), path)
    visualize.save_overlay_png(ct_xyz, volume, stem.parent / f"{stem.name}.png", np.linalg.norm(affine[:3, :3], axis=0))
    return path


def replace_non_finite(obj, path: str = "") -> tuple[object, list[str]]:
    """``obj`` (nested dicts, lists, numbers) with every infinite or NaN float replaced by ``None``, and
    the ``"path: value"`` of each one replaced (paths like ``zero_shot/per_class/Emphysema/threshold/value``).

    The metric functions define their undefined numbers as ``null`` with a reason; this is the last guard
    before ``metrics.json`` is written (``json.dumps(..., allow_nan=False)``), so that a number nobody
    expected to be infinite is reported by name instead of ending the evaluation with ``ValueError``.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [f"{path}: {obj}"]
    if isinstance(obj, dict):
        pairs = {k: replace_non_finite(v, f"{path}/{k}" if path else str(k)) for k, v in obj.items()}
        return {k: v for k, (v, _) in pairs.items()}, [bad for _, found in pairs.values() for bad in found]
    if isinstance(obj, (list, tuple)):
        pairs = [replace_non_finite(v, f"{path}/{i}") for i, v in enumerate(obj)]
        return [v for v, _ in pairs], [bad for _, found in pairs for bad in found]
    return obj, []


def _value(entry) -> str:
    """A report entry as text: the number, or ``null (reason)``."""
    if not isinstance(entry, dict) or "value" not in entry:
        return "n/a"
    return f"{entry['value']:.3f}" if entry["value"] is not None else f"null ({entry.get('reason', '')})"


def headline_metrics(report: dict) -> dict[str, float]:
    """The headline numbers of an evaluation report as flat scalars, for experiment trackers (MLflow).

    Retrieval Recall@1/5/10, mean rank and chance Recall@1 per direction, macro AUROC of each finding subset
    (zero-shot and finding head), the report-region AUROC and the step-to-region accuracy. A number the data
    cannot define (``null`` in the report) is left out.
    """
    entries = {"cases": {"value": report["cases"]}}
    for direction in ("image_to_text", "text_to_image"):
        entry = report["retrieval"][direction]
        entries.update({f"recall@{k}_{direction}": entry[f"recall@{k}"] for k in (1, 5, 10)})
        entries[f"mean_rank_{direction}"] = entry["mean_rank"]
        entries[f"chance_recall@1_{direction}"] = entry["chance"]["recall@1"]
    for section in ("zero_shot", "finding_head"):
        for name, macro in report[section].get("macro", {}).items():
            entries[f"{section}_macro_auroc_{name}"] = macro["auroc"]
    entries["report_region_auroc"] = report["grounding"].get("report_region_auroc", {}).get("pooled")
    entries["step_region_accuracy"] = report["chain_of_thought"].get("step_region_accuracy")
    return {
        name: float(entry["value"])
        for name, entry in entries.items()
        if isinstance(entry, dict) and isinstance(entry.get("value"), (int, float))
    }


def summary(report: dict) -> str:
    """The headline numbers of an evaluation report, one line each, for the console."""
    lines = []
    for direction in ("image_to_text", "text_to_image"):
        entry = report["retrieval"][direction]
        recalls = ", ".join(f"R@{k} {_value(entry[f'recall@{k}'])}" for k in (1, 5, 10))
        chance = _value(entry["chance"]["recall@1"])
        lines.append(f"retrieval {direction}: {recalls}, mean rank {_value(entry['mean_rank'])} (chance R@1 {chance})")
    for section in ("zero_shot", "finding_head"):
        if "macro" in report[section]:
            aurocs = ", ".join(f"{name} {_value(m['auroc'])}" for name, m in report[section]["macro"].items())
            lines.append(f"{section} macro AUROC (CT-CLIP's mean over every finding): {aurocs}")
        else:
            lines.append(f"{section}: {_value(report[section])}")
    grounding = report["grounding"]
    region_auroc = grounding["report_region_auroc"]["pooled"] if "report_region_auroc" in grounding else grounding
    lines.append(f"report-region AUROC: {_value(region_auroc)}")
    cot = report["chain_of_thought"]
    step_accuracy = cot["step_region_accuracy"] if "step_region_accuracy" in cot else cot
    lines.append(f"chain of thought: step->region accuracy {_value(step_accuracy)}")
    return "\n".join(lines)


class EvaluationReport:
    """Ignite handler of `CTReportEvaluator`: accumulate per-case rows, then write metrics, CSV, figures, maps.

    Args:
        output_dir: where ``metrics.json``, ``per_case.csv``, ``figures/`` and ``maps/`` go.
        model: the `CTReportCLIP` being evaluated (prompts, logit scale, slice-bias tables).
        dataset: the evaluation dataset (case ids, studies and CT files by case index).
        input_size: the network input ``(D, H, W)``, to place maps in world coordinates.
        region_names: the ``R`` region names (`RegionMap.names`).
        templates: zero-shot ``(present, absent)`` prompt pairs, averaged when several.
        retrieval_ks, tie_mode, pool_size, one_per_study: the retrieval protocol (`retrieval_metrics`).
        threshold_method, n_bootstrap, seed: the classification protocol (`classification_metrics`).
        num_maps: cases (lowest case indices) that get CLS attention maps and, with a local projection
            head, report-to-patch similarity maps.
        summary_writer_dir: TensorBoard folder for the figures, or ``None``.

    Raises:
        ValueError: empty ``templates``.
    """

    def __init__(
        self,
        output_dir: str,
        model: torch.nn.Module,
        dataset,
        input_size: Sequence[int],
        region_names: Sequence[str],
        templates: Sequence[Sequence[str]] = M.CT_CLIP_TEMPLATES,
        retrieval_ks: Sequence[int] = M.RETRIEVAL_KS,
        tie_mode: str = "mean",
        pool_size: int | None = None,
        one_per_study: bool = True,
        threshold_method: str = "ct_clip",
        n_bootstrap: int = 1000,
        seed: int = 0,
        num_maps: int = 2,
        summary_writer_dir: str | None = None,
    ) -> None:
        if not templates:
            raise ValueError("at least one (present, absent) prompt template is needed")
        self.output_dir = Path(output_dir)
        self.model, self.dataset = model, dataset
        self.input_size = tuple(int(s) for s in input_size)
        self.region_names = tuple(region_names)
        self.templates = [tuple(t) for t in templates]
        self.retrieval_ks, self.tie_mode, self.pool_size, self.one_per_study = (
            tuple(retrieval_ks),
            tie_mode,
            pool_size,
            one_per_study,
        )
        self.threshold_method, self.n_bootstrap, self.seed = threshold_method, n_bootstrap, seed
        self.num_maps = num_maps
        self.summary_writer_dir = summary_writer_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._finish)  # before trackers log the epoch's metrics

    @property
    def _rank0(self) -> bool:
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def _start(self, engine: Engine) -> None:
        self.device = torch.device(engine.state.device)  # gathers run where the backend does (CUDA for nccl)
        self.cases = M.CaseAccumulator(self.device)
        self.steps = M.CaseAccumulator(self.device)
        self.prompts = compute_prompt_embeddings(self.model, self.templates)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._rank0:
            logger.info(f"evaluating {len(self.dataset)} cases; the report goes to {self.output_dir}")

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        feats = out["features"]
        rows = {
            "image": feats["global_embedding"],
            "text": out["text_embedding"],
            "keys": out["keys"],
            "labels": out["labels"],
            "region_present": feats["region_present"],
            "region_mention": out["region_mention"],
            "region_z": M.region_slice_centroids(feats["patch_to_region"], feats["patch_positions"]),
        }
        if "region_embedding" in feats:
            rows["region"] = feats["region_embedding"]
        if "finding_logits" in feats:
            rows["finding_logits"] = feats["finding_logits"]
        self.cases.update(out["case_index"], rows)
        if out["step_embedding"] is not None and out["step_key"].shape[0]:
            self.steps.update(out["step_key"], {"embedding": out["step_embedding"], "tags": out["step_tags"]})
        for row, case in enumerate(out["case_index"].tolist()):
            if case < self.num_maps and out["grid_affine"] is not None:
                self._save_maps(case, row, out)

    def _save_maps(self, case: int, row: int, out: dict) -> None:
        """Text-to-patch similarity and CLS attention of one case, on the original CT grid and as PNGs."""
        feats = out["features"]
        grid = self._patch_grid()
        case_id = self.dataset.data[case].get("case_id", str(case))
        maps = {"cls_attention": out["cls_attention"][row].reshape(grid)}
        if "local_embedding" in feats:  # the report-to-patch map needs the local projection head
            maps["text_to_patch"] = M.text_patch_similarity(
                feats["local_embedding"][row], out["text_embedding"][row], grid
            )
        for name, patch_map in maps.items():
            save_map_on_ct(
                patch_map, out["grid_affine"][row], out["grid_shape"][row], self.input_size, out[Keys.IMAGE][row, 0],
                self.dataset.data[case]["image"], self.output_dir / "maps" / f"{case_id}_{name}",
            )  # fmt: skip

    def _patch_grid(self) -> tuple[int, int, int]:
        patch = self.model.image_encoder.patch_embed.patch_size
        return tuple(s // p for s, p in zip(self.input_size, patch))

    def _finish(self, engine: Engine) -> None:
        case_index, rows = _to_cpu(self.cases.gather())
        step_key, step_rows = _to_cpu(self.steps.gather()) if self._any_steps() else (None, None)
        if not self._rank0:
            return
        report, non_finite = replace_non_finite(self._report(case_index, rows, step_key, step_rows))
        if non_finite:
            report["non_finite_values_replaced_by_null"] = non_finite
            logger.warning(f"non-finite numbers in the evaluation report, written as null: {non_finite}")
        (self.output_dir / "metrics.json").write_text(json.dumps(report, indent=4, allow_nan=False) + "\n")
        engine.state.evaluation_report = report
        engine.state.metrics.update(headline_metrics(report))
        logger.info(f"evaluation of {case_index.numel()} cases written to {self.output_dir}\n{summary(report)}")

    def _any_steps(self) -> bool:
        has = torch.tensor([1 if self.steps._keys else 0], device=self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(has)
        return bool(has.item())

    def _report(self, case_index, rows, step_key, step_rows) -> dict:
        data = [self.dataset.data[i] for i in case_index.tolist()]
        report: dict = {"cases": int(case_index.numel())}
        evaluated = set(case_index.tolist())
        report["cases_not_evaluated"] = [
            {"case_index": i, "case_id": item.get("case_id", str(i)), "image": item.get("image"),
             "reason": "refused while loading (the log names the problem)"}
            for i, item in enumerate(self.dataset.data) if i not in evaluated
        ]  # fmt: skip
        # retrieval: one volume per study (CT-CLIP protocol), duplicates of a report are one group
        retrieval, keep, groups = M.study_retrieval(
            case_index, rows["image"], rows["text"], rows["keys"], self.retrieval_ks, self.tie_mode, self.one_per_study,
            self.pool_size, self.seed,
        )  # fmt: skip
        report["retrieval"] = retrieval
        # zero-shot classification with CT-CLIP's prompts
        logit_scale = float(self.model.logit_scale().detach())
        probabilities = M.zero_shot_probabilities(rows["image"], self.prompts, logit_scale)  # (M, 18)
        labels = rows["labels"]
        report["zero_shot"] = M.classification_metrics(
            probabilities,
            labels,
            FINDINGS,
            self.threshold_method,
            self.n_bootstrap,
            self.seed,
            macro_subsets=M.CT_RATE_MACRO_SUBSETS,
        )
        report["zero_shot"]["protocol"]["templates"] = [list(t) for t in self.templates]
        if "finding_logits" in rows:
            report["finding_head"] = M.classification_metrics(
                torch.sigmoid(rows["finding_logits"]),
                labels,
                FINDINGS,
                self.threshold_method,
                self.n_bootstrap,
                self.seed,
                macro_subsets=M.CT_RATE_MACRO_SUBSETS,
            )
        else:
            report["finding_head"] = {"value": None, "reason": "the model has no finding head"}
        report["grounding"] = self._grounding(rows)
        report["chain_of_thought"] = self._cot(case_index, rows, step_key, step_rows)
        self._write_case_table(data, case_index, rows, probabilities, keep, groups)
        self._figures(probabilities, labels, retrieval)
        return report

    def _grounding(self, rows) -> dict:
        if "region" not in rows:
            return {
                "value": None,
                "reason": "the model has no region projection head (projection_heads lacks 'region')",
            }
        finding_present = M.ensemble_prompts(self.prompts)[:, 0]  # (K, E): "{finding} is present."
        similarity = M.finding_region_similarity(rows["region"], finding_present)  # (M, K, R)
        region_to_report = torch.einsum(
            "mre,me->mr", F.normalize(rows["region"], dim=-1), F.normalize(rows["text"], dim=-1)
        )
        return {
            "top_regions_per_finding": M.top_regions_per_finding(
                similarity, rows["region_present"], FINDINGS, self.region_names
            ),
            "report_region_auroc": M.region_auroc(
                region_to_report, rows["region_mention"].double(), self.region_names, rows["region_present"]
            ),
            "definition": "report_region_auroc: per case, the cosine of each present region's embedding to the report "
            "embedding scores whether the report has a non-normal sentence on that region",
        }

    def _cot(self, case_index, rows, step_key, step_rows) -> dict:
        if step_key is None:
            return {"value": None, "reason": "no chain-of-thought steps in the evaluation data"}
        if "region" not in rows:
            return {
                "value": None,
                "reason": "the model has no region projection head (projection_heads lacks 'region')",
            }
        return M.cot_alignment(
            step_rows["embedding"],
            step_key[:, 0],
            step_rows["tags"],
            case_index,
            rows["region"],
            rows["region_present"],
            rows["region_z"],
        )

    def _write_case_table(self, data, case_index, rows, probabilities, keep, groups) -> None:
        image = F.normalize(rows["image"][keep], dim=-1).double()
        text = F.normalize(rows["text"][keep], dim=-1).double()
        relevant = groups[:, None] == groups[None, :]
        ranks = {
            "image_to_text_rank": M.retrieval_ranks(image @ text.T, relevant, self.tie_mode),
            "text_to_image_rank": M.retrieval_ranks(text @ image.T, relevant, self.tie_mode),
        }
        rank_of = {k: dict(zip(keep, v.tolist())) for k, v in ranks.items()}
        with open(self.output_dir / "per_case.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "case_index",
                    "case_id",
                    "study",
                    *ranks,
                    *[f"p({x})" for x in FINDINGS],
                    *[f"label({x})" for x in FINDINGS],
                ]
            )
            for pos, (index, item) in enumerate(zip(case_index.tolist(), data)):
                writer.writerow([
                    index, item.get("case_id", ""), item.get("study", ""),
                    *[rank_of[k].get(pos, "") for k in ranks],
                    *[f"{p:.6f}" for p in probabilities[pos].tolist()],
                    *["" if math.isnan(v) else int(v) for v in rows["labels"][pos].tolist()],
                ])  # fmt: skip

    def _figures(self, probabilities, labels, retrieval) -> None:
        figures = self.output_dir / "figures"
        paths = [visualize.plot_recall_at_k(retrieval, figures / "recall_at_k.png"), figures / "roc_zero_shot.png"]
        visualize.plot_roc_curves(probabilities, labels, FINDINGS, paths[1])
        blocks = self.model.image_encoder.blocks
        for name, block in (("first", blocks[0]), ("last", blocks[-1])):
            if block.attn.slice_bias is not None:
                paths.append(
                    visualize.plot_slice_bias(
                        block.attn.slice_bias.detach().cpu(), figures / f"slice_bias_{name}_block.png"
                    )
                )
        if self.summary_writer_dir is not None:
            from PIL import Image
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(self.summary_writer_dir) as writer:
                for path in paths:
                    writer.add_image(
                        f"evaluation/{Path(path).stem}", np.asarray(Image.open(path).convert("RGB")), dataformats="HWC"
                    )
