"""Seconds per case of the bundle from its three consumers, on the bundled real DICOM series (demo model).

- ``bundle``: ``monai.bundle run`` inference (``configs/inference.json`` + ``configs/demo.json``, ``--seg_source
  none``), one case per run: the run's wall time over reading the series, resampling, the network and the writers.
- ``label``: MONAI Label's ``BundleInferTask`` (`scripts.integration.monai_label.finding_score_task`), one request
  (series folder in, 18 scores out), after a first request that loads the model; needs ``requirements-label.txt``.
- ``deploy``: the MONAI Deploy application (`scripts.integration.deploy_app`), one process per run: the wall time of
  the process (interpreter, Holoscan start, DICOM parsing, model.ts load, inference); needs
  ``requirements-deploy.txt``.

The weights are random (seeded); speed does not depend on them. Run from the bundle root, in each environment::

    python -m scripts.benchmarks.integration --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
SERIES = BUNDLE_ROOT / "tests/data/dicom/upper_abdomen_series"


def _demo_bundle(work: Path) -> Path:
    """A bundle copy for the demo model: merged inference config, seeded weights, prompt embeddings, model.ts."""
    from monai.bundle import ConfigParser, ckpt_export
    from scripts.integration.served_bundle import write_served_bundle

    parser = ConfigParser()
    parser.read_config([str(BUNDLE_ROOT / "configs/train.json"), str(BUNDLE_ROOT / "configs/demo.json")])
    parser["bundle_root"] = str(BUNDLE_ROOT)
    torch.manual_seed(0)
    clip = parser.get_parsed_content("clip_model").eval()
    root = write_served_bundle(work / "ct_anatomy_clip", clip, ["configs/demo.json"])
    ckpt_export(
        net_id="network_def",
        filepath=str(root / "models/model.ts"),
        ckpt_file=str(root / "models/model.pt"),
        args_file=str(BUNDLE_ROOT / "configs/demo_export.json"),  # its paths are relative to the bundle root
        bundle_root=str(BUNDLE_ROOT),
    )
    return root


def time_bundle(root: Path, work: Path, repeats: int) -> list[float]:
    from monai.bundle import ConfigWorkflow

    cases = work / "cases"
    cases.mkdir(exist_ok=True)
    if not (cases / SERIES.name).exists():
        (cases / SERIES.name).symlink_to(SERIES, target_is_directory=True)
    seconds = []
    for i in range(repeats):
        start = time.perf_counter()
        workflow = ConfigWorkflow(
            config_file=[str(BUNDLE_ROOT / "configs/inference.json"), str(BUNDLE_ROOT / "configs/demo.json")],
            workflow_type="infer", bundle_root=str(BUNDLE_ROOT), ckpt_dir=str(root / "models"),
            dataset_dir=str(cases), output_dir=str(work / f"bundle_{i}"), seg_source="none",
        )  # fmt: skip
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        seconds.append(time.perf_counter() - start)
    return seconds


def time_label(root: Path, repeats: int) -> list[float]:
    from scripts.integration.monai_label import finding_score_task

    task = finding_score_task(str(root), {})
    task({"image": str(SERIES), "device": "cpu"})  # loads the model
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        task({"image": str(SERIES), "device": "cpu"})
        seconds.append(time.perf_counter() - start)
    return seconds


def time_deploy(root: Path, work: Path, repeats: int) -> list[float]:
    seconds = []
    for i in range(repeats):
        command = [sys.executable, "-m", "scripts.integration.deploy_app", "-i", str(SERIES),
                   "-o", str(work / f"deploy_{i}"), "-m", str(root / "models/model.ts")]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, cwd=BUNDLE_ROOT, check=True, capture_output=True)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "case": SERIES.name}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = _demo_bundle(work)
        results["bundle_s"] = time_bundle(root, work, args.repeats)
        if importlib.util.find_spec("monailabel") is not None:
            results["label_s"] = time_label(root, args.repeats)
        if importlib.util.find_spec("monai.deploy") is not None:
            results["deploy_s"] = time_deploy(root, work, args.repeats)
    for key in [k for k in results if k.endswith("_s")]:
        results[key.replace("_s", "_median_s")] = round(statistics.median(results[key]), 2)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
