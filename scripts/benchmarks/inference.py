"""Seconds per case of the inference workflow (configs/inference.json), from reading the files to the outputs.

Run from the bundle root:

    python -m scripts.benchmarks.inference [--dataset_dir DIR] [--configs inference.json demo.json] [--repeats 3]

Runs the whole workflow (`python -m monai.bundle run --config_file configs/inference.json ...` as a user
does, in this process) on ``DIR`` (default: the bundled NIfTI crops, tests/data/sample) and on the bundled
DICOM series with its mask (tests/data/dicom), with random weights of the configuration's ``network_def``
(the time does not depend on the weights), and splits each case's wall time with Ignite events:

- ``read+preprocess``: getting the case from the data loader (DICOM header checks, reading the files,
  the bundle's checks, reorientation, resampling, crop/pad and HU window); ``num_workers`` 0, so it is
  not hidden behind the network;
- ``network``: ``forward_features`` and the CLS attention row;
- ``outputs``: embeddings, scores, maps resampled onto the input CT's own grid, case.json.

The DICOM dataset holds the series four times, so its median is not a fresh engine's first iteration.

It also times the seed configuration's preprocessing alone (inference.json without overrides: 0.75 x 0.75
x 5 mm, 64 x 512 x 512) on the DICOM series, the input a seed model would get. The first DICOM read in a
process also loads ITK's modules; it is reported apart. Prints medians over the cases and repeats, of wall
time and of this process's CPU time (all threads; less sensitive to other programs on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.engines.utils import IterationEvents

BUNDLE_ROOT = Path(__file__).resolve().parents[2]
DICOM_CASES = BUNDLE_ROOT / "tests/data/dicom"
STAGES = ("read+preprocess", "network", "outputs", "total")


def _dicom_dataset(folder: Path, copies: int = 4) -> Path:
    """A dataset folder holding the bundled series and its mask ``copies`` times (links), under the names
    inference pairs by, so that the median is not the first iteration of a fresh engine."""
    (folder / "seg").mkdir(parents=True)
    for i in range(copies):
        (folder / f"series_{i}").symlink_to(DICOM_CASES / "upper_abdomen_series")
        (folder / f"seg/series_{i}.nii.gz").symlink_to(DICOM_CASES / "upper_abdomen_series_seg.nii.gz")
    return folder


def time_workflow(configs: list[str], dataset_dir: Path, work: Path) -> list[dict]:
    """Run the inference workflow once on ``dataset_dir``; one row of stage times (s) per case."""
    files = [str(BUNDLE_ROOT / "configs" / c) for c in configs]
    overrides = dict(bundle_root=str(BUNDLE_ROOT), dataset_dir=str(dataset_dir), ckpt_dir=str(work / "models"),
                     output_dir=str(work / "out"), num_workers=0)  # fmt: skip
    workflow = ConfigWorkflow(config_file=files, workflow_type="infer", **overrides)
    workflow.initialize()
    (work / "models").mkdir(parents=True, exist_ok=True)
    torch.save(workflow.parser.get_parsed_content("network_def").state_dict(), work / "models/model.pt")
    engine = workflow.parser.get_parsed_content("evaluator")
    rows, now = [], {}

    def mark(name):
        return lambda e: now.__setitem__(name, (time.perf_counter(), time.process_time()))

    engine.add_event_handler(Events.GET_BATCH_STARTED, mark("batch"))
    engine.add_event_handler(Events.ITERATION_STARTED, mark("iteration"))
    engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, mark("forward"))

    @engine.on(Events.ITERATION_COMPLETED)
    def _row(e):  # attached after the workflow's own handlers: runs last
        if "refused" in e.state.output["case"]:
            return
        end = (time.perf_counter(), time.process_time())
        for clock in (0, 1):  # wall, then CPU time of this process (all its threads)
            rows.append({
                "clock": ("wall", "cpu")[clock], "read+preprocess": now["iteration"][clock] - now["batch"][clock],
                "network": now["forward"][clock] - now["iteration"][clock], "outputs": end[clock] - now["forward"][clock],
                "total": end[clock] - now["batch"][clock],
            })  # fmt: skip

    workflow.run()
    workflow.finalize()
    return rows


def _median(rows: list[dict], key: str, clock: str) -> float:
    return statistics.median(r[key] for r in rows if r["clock"] == clock)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default=str(BUNDLE_ROOT / "tests/data/sample"))
    parser.add_argument("--configs", nargs="+", default=["inference.json", "demo.json"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; configs {args.configs}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dicom = _dicom_dataset(tmp / "dicom_dataset")
        t = time.perf_counter()
        from monai.transforms import LoadImage

        LoadImage(image_only=True)(str(DICOM_CASES / "upper_abdomen_series"))
        print(f"first DICOM read in this process (loads ITK's modules): {time.perf_counter() - t:.2f} s")
        for name, folder in (("NIfTI crops", Path(args.dataset_dir)), ("DICOM series 512 x 512 x 12", dicom)):
            rows = []
            for r in range(args.repeats):
                rows += time_workflow(args.configs, folder, tmp / f"{name[:5]}_{r}")
            cases = len(rows) // 2 // args.repeats
            for clock in ("wall", "cpu"):
                stages = ", ".join(f"{k} {_median(rows, k, clock):.3f}" for k in STAGES)
                print(f"{name}: {cases} cases x {args.repeats} runs; median {clock} s per case: {stages}")
        seed = ConfigParser()
        seed.read_config(str(BUNDLE_ROOT / "configs/inference.json"))
        seed.update(dict(bundle_root=str(BUNDLE_ROOT), output_dir=str(tmp / "seed_out"), min_slices=8))
        chain = seed.get_parsed_content("case_transform")
        case = {"image": str(dicom / "series_0"), "seg": str(dicom / "seg/series_0.nii.gz"), "case_id": "series_0",
                "input_kind": "dicom"}  # fmt: skip
        times = []
        for _ in range(args.repeats):
            t, c = time.perf_counter(), time.process_time()
            out = chain(dict(case))
            times.append((time.perf_counter() - t, time.process_time() - c))
        wall, cpu = (statistics.median(t[i] for t in times) for i in (0, 1))
        shape = tuple(out["image"].shape)
        print(f"seed preprocessing of the DICOM series to {shape}: median {wall:.3f} s wall, {cpu:.3f} s cpu")


if __name__ == "__main__":
    main()
