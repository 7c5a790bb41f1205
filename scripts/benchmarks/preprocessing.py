"""Cold vs warm preprocessing: what `CTReportDataset`'s on-disk cache saves per volume.

Run from the bundle root:

    python -m scripts.benchmarks.preprocessing [--config configs/train.json] [--dataset_dir DIR] [--limit 40]

Builds the training dataset of the given config (seed spacing and input size by default) on
``DIR/datalist.json`` (default: the bundled sample crops, tests/data/sample; the three whole source CTs
come from ``python tests/data/make_sample_data.py --full-volumes DIR``) with a fresh cache folder,
then reads every item twice in one process: the cold pass runs the whole chain and writes
the cache, the warm pass reads the cache and runs only the part after `EndOfCache` (crop, pad, pack
as int16). It prints seconds per volume for both passes, their ratio, the time of the cached stage alone
(cold: compute and write; warm: read), the size of a cached volume on disk and in memory, and the CPU
time of the HU window (`scripts.data.WindowPackedCT`) that the engines run on the device batch, not
in the data workers: on a GPU that step is a few elementwise kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from scripts.data import read_cache_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/train.json")
    parser.add_argument("--dataset_dir", default="tests/data/sample")
    parser.add_argument("--limit", type=int, default=40, help="volumes to read")
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(args.config)
    config["dataset_dir"] = str(Path(args.dataset_dir).resolve())
    with tempfile.TemporaryDirectory() as cache:
        config["cache_dir"] = cache
        config["hu_air_check"] = False  # crops may hold no air
        config["min_slices"] = 8
        config["text_model_name"] = None  # no tokenizer: the datalist's token count is not timed (works offline)
        dataset = config.get_parsed_content("train#dataset")
        dataset.set_data(dataset.data[: args.limit])
        cached_stage = Compose(config.get_parsed_content("load_transforms"))
        window = config.get_parsed_content("input_window")
        timings = {}
        for name in ("cold", "warm"):
            per_volume, stage = [], []
            for i in range(len(dataset)):
                start = time.perf_counter()
                item = dataset[i]
                per_volume.append(time.perf_counter() - start)
            files = sorted(Path(cache).glob("*.pt"))
            for i in range(len(dataset)):  # the cached stage alone: compute (cold) vs read back (warm)
                start = time.perf_counter()
                if name == "cold":
                    cached_stage(dict(dataset.data[i]))
                else:
                    read_cache_file(files[i % len(files)])
                stage.append(time.perf_counter() - start)
            timings[name] = (statistics.mean(per_volume), statistics.mean(stage))
        window_s = []
        for _ in range(3):
            start = time.perf_counter()
            window(item["image"])
            window_s.append(time.perf_counter() - start)
        files = sorted(Path(cache).glob("*.pt"))
        disk = statistics.mean(f.stat().st_size for f in files)
        cached = [read_cache_file(f) for f in files]
        memory = statistics.mean(
            sum(v.element_size() * v.numel() for v in c.values() if isinstance(v, torch.Tensor)) for c in cached
        )
        sample = cached[0]
    result = {
        "dataset_dir": args.dataset_dir,
        "volumes": len(dataset),
        "spacing_mm": config["spacing_mm"],
        "input_size": config["input_size"],
        "network_input_shape": list(item["image"].shape),
        "packed_input_dtype": str(item["image"].dtype),
        "cold_s_per_volume": round(timings["cold"][0], 4),
        "warm_s_per_volume": round(timings["warm"][0], 4),
        "cold_over_warm": round(timings["cold"][0] / timings["warm"][0], 2),
        "cached_stage_compute_s": round(timings["cold"][1], 4),
        "cached_stage_read_s": round(timings["warm"][1], 4),
        "cached_volume_bytes_on_disk": int(disk),
        "cached_volume_bytes_in_memory": int(memory),  # mean over volumes, as on disk
        "window_on_cpu_s": round(statistics.median(window_s), 4),
        "cached_dtypes": {k: str(v.dtype) for k, v in sample.items() if isinstance(v, torch.Tensor)},
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=4))


if __name__ == "__main__":
    main()
