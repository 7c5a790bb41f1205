"""Small ablation on the bundled sample: what the anatomy-aware block and the multi-level terms change.

Run from the bundle root (about 5 minutes on 2 CPU cores):

    python -m scripts.ablation [--epochs 40] [--seed 0] [--json ablation.json]

Trains three variants with `configs/train.json` + `configs/demo.json` (+ `configs/ablation.json` for the
weights of the full objective) on the sample's 66 training crops, each with the same seed:

- (a) plain ViT blocks (`block_type="plain"`), global InfoNCE only;
- (b) anatomy-aware blocks, global InfoNCE only;
- (c) anatomy-aware blocks, all terms (global, region-sentence, chain-of-thought step, local,
  auxiliary segmentation, finding head; the sample has no finding labels, so that term is 0).

Each is evaluated on the 20 held-out validation crops (another patient): Recall@1 and Recall@5 in both
directions (`scripts.metrics.retrieval_metrics`, mean tie handling), and the region-assignment accuracy
of a linear probe fitted on the frozen patch features of the training crops (the same probe for every
variant, so anatomy kept in the local features is compared fairly); variant (c) also reports its own
auxiliary head. It prints a Markdown table. This is a small-sample sanity check, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from monai.bundle import ConfigWorkflow

from .losses import SegmentationLoss, pair_keys, positive_groups
from .metrics import region_assignment_counts, retrieval_metrics
from .networks import SegmentationAuxHead

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "a_plain_global": {"block_type": "plain"},
    "b_anatomy_global": {"block_type": "anatomy"},
    "c_anatomy_all_terms": {"block_type": "anatomy", "config": "configs/ablation.json"},
}


def _workflow(variant: dict, epochs: int, seed: int, work: Path) -> ConfigWorkflow:
    configs = [str(ROOT / "configs/train.json"), str(ROOT / "configs/demo.json")]
    if "config" in variant:
        configs.append(str(ROOT / variant["config"]))
    return ConfigWorkflow(
        config_file=configs,
        meta_file=str(ROOT / "configs/metadata.json"),
        logging_file=str(ROOT / "configs/logging.conf"),
        workflow_type="train",
        bundle_root=str(ROOT),
        ckpt_dir=str(work / "models"),
        log_dir=str(work / "logs"),
        cache_dir=str(work.parent / "cache"),
        max_epochs=epochs,
        val_interval=epochs,
        seed=seed,
        block_type=variant["block_type"],
    )


@torch.no_grad()
def _embed(model, dataset, window) -> dict:
    """Features of every item of a dataset, in order, with the eval-mode model (``window``: the packed
    input's HU window, `scripts.data.WindowPackedCT`)."""
    model.eval()
    rows: dict[str, list] = {"image": [], "text": [], "keys": [], "local": [], "p2r": [], "bg": [], "seg": []}
    for i in range(len(dataset)):
        item = dataset[i]
        out = model(window(item["image"][None]), [item["text"]])
        features = out["image_features"]
        rows["image"].append(features["global_embedding"])
        rows["text"].append(out["text_embedding"])
        rows["keys"].append(pair_keys([item["study"]], [item["text"]]))
        rows["local"].append(features["local_features"])
        rows["p2r"].append(features["patch_to_region"])
        rows["bg"].append(features["background_fraction"])
        if "segmentation_logits" in features:
            rows["seg"].append(features["segmentation_logits"])
    return {k: torch.cat(v) for k, v in rows.items() if v}


def _probe_accuracy(train: dict, val: dict, num_regions: int, seed: int, steps: int = 300) -> float:
    """Region-assignment accuracy of a linear probe (`SegmentationAuxHead`) on frozen patch features."""
    torch.manual_seed(seed)
    head = SegmentationAuxHead(train["local"].shape[-1], num_regions)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    loss = SegmentationLoss()
    for _ in range(steps):
        optimizer.zero_grad()
        loss(head(train["local"]), train["p2r"], train["bg"]).backward()
        optimizer.step()
    with torch.no_grad():
        correct, counted = region_assignment_counts(head(val["local"]), val["p2r"], val["bg"])
    return correct.item() / max(counted.item(), 1)


def run(epochs: int, seed: int) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in VARIANTS.items():
            workflow = _workflow(variant, epochs, seed, Path(tmp) / name)
            workflow.initialize()
            workflow.run()
            model = workflow.parser.get_parsed_content("network")
            window = workflow.parser.get_parsed_content("input_window")
            train = _embed(model, workflow.parser.get_parsed_content("train#dataset"), window)
            val = _embed(model, workflow.parser.get_parsed_content("validate#dataset"), window)
            workflow.finalize()
            retrieval = retrieval_metrics(val["image"], val["text"], positive_groups(val["keys"]), ks=(1, 5))
            result = {
                f"{d}_recall@{k}": retrieval[d][f"recall@{k}"]["value"]
                for d in ("image_to_text", "text_to_image")
                for k in (1, 5)
            }
            result["chance_recall@1"] = retrieval["image_to_text"]["chance"]["recall@1"]["value"]
            result["probe_region_accuracy"] = _probe_accuracy(train, val, model.image_encoder.num_regions, seed)
            if "seg" in val:
                correct, counted = region_assignment_counts(val["seg"], val["p2r"], val["bg"])
                result["aux_head_region_accuracy"] = correct.item() / max(counted.item(), 1)
            results[name] = result
    return results


def markdown(results: dict) -> str:
    columns = ["image_to_text_recall@1", "text_to_image_recall@1", "image_to_text_recall@5", "text_to_image_recall@5",
               "chance_recall@1", "probe_region_accuracy", "aux_head_region_accuracy"]  # fmt: skip
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, result in results.items():
        cells = [f"{result[c]:.3f}" if result.get(c) is not None else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results = run(args.epochs, args.seed)
    print(markdown(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=4) + "\n")


if __name__ == "__main__":
    main()
