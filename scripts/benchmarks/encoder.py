"""Speed and memory of the encoder: attention paths, anatomy vs plain blocks vs MONAI's ViT, seed size, data side.

Run from the bundle root:

    python -m scripts.benchmarks.encoder                      # CPU, a few minutes
    python -m scripts.benchmarks.encoder --seed-size          # + one 64 x 512 x 512 forward of the seed config
    python -m scripts.benchmarks.encoder --device cuda        # GPU figures (imports torch and scripts.networks only)

CPU (default): at each token count (patch grid 16 x Y x X, patch (4, 16, 16), width 768, 12 heads,
``--depth`` blocks, batch ``--batch``, inference), the anatomy encoder with each ``--impl`` path, the same
encoder with plain blocks, and MONAI's `ViT` of the same width, depth, heads and patch with its SDPA
attention switched on, timed interleaved in one process (round by round, in a shuffled order; medians),
so that load from other programs hits all of them alike. Memory: each variant's peak resident memory
growth during one forward, each in a fresh child process (Linux ``/proc``: ``VmHWM`` reset through
``clear_refs``), once with glibc's default allocator settings and once with a fixed 1 MB mmap threshold
(peak follows the live tensors, not heap fragmentation). Then the data side:
`scripts.benchmarks.preprocessing` (volumes/s per worker from the preprocessing cache).
``--seed-size`` adds one forward of the seed configuration (the ``network_def`` that
`configs/train.json` builds on a CPU, float32, inference) on a real sample CT + mask prepared by
`configs/train.json`'s validation chain (64 x 512 x 512), timed in a child process with its peak
resident memory.

CUDA: `scripts.benchmarks.throughput.device_figures` (forward latency, volumes/s at batch 1 and 8 and
peak memory of the seed configuration at full input for every ``--impl``, bf16 autocast; a training step).

On a machine shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``: with libgomp's default
waiting, every two-thread parallel region waits for a descheduled thread, which inflates small
operations many times over (the setting is recorded with the results).

Results are merged into ``OUTPUT_DIR/performance.json`` (sections not run are kept) and
``OUTPUT_DIR/performance.md`` is rewritten from it.
"""

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from scripts.benchmarks import report
from scripts.benchmarks.throughput import (
    BUNDLE_ROOT,
    SEED_INPUT,
    build_encoder,
    device_figures,
    inference,
    synthetic_input,
    timed,
)

PATCH = (4, 16, 16)
SLICE_ROWS = 16  # patch rows along z, as at the seed size
REFERENCE_MAX_TOKENS = 4096  # the reference path holds (heads, T, T) floats: 12.9 GB per block at 16,385 tokens
DTYPES = {"float32": None, "bfloat16": torch.bfloat16}
# glibc serves blocks above this from mmap and returns them on free, so peak RSS follows the live tensors
# instead of heap fragmentation (by default the threshold grows to 32 MB as large blocks are freed)
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def grid_for_tokens(tokens: int) -> tuple[int, int, int]:
    """Patch grid ``(16, Y, X)`` with ``Y * X = tokens / 16`` and ``Y <= X`` as close as possible.

    Raises:
        ValueError: ``tokens`` is not a multiple of 16.
    """
    if tokens % SLICE_ROWS:
        raise ValueError(f"tokens must be a multiple of {SLICE_ROWS}, got {tokens}")
    plane = tokens // SLICE_ROWS
    y = math.isqrt(plane)
    while plane % y:
        y -= 1
    return SLICE_ROWS, y, plane // y


def input_for_tokens(tokens: int) -> tuple[int, int, int]:
    """Input ``(D, H, W)`` whose patch grid holds ``tokens`` patches."""
    return tuple(g * p for g, p in zip(grid_for_tokens(tokens), PATCH))


def monai_vit(input_size: Sequence[int], depth: int, width: int = 768, heads: int = 12) -> torch.nn.Module:
    """MONAI's `ViT` with our width, depth, heads and patch, its blocks on SDPA.

    MONAI 1.6.1's `ViT` does not take ``use_flash_attention`` (its `SABlock` does), so the flag is set on
    each block's attention after construction; ``qkv_bias=True`` as in our blocks.
    """
    from monai.networks.nets import ViT

    vit = ViT(
        in_channels=1,
        img_size=tuple(input_size),
        patch_size=PATCH,
        hidden_size=width,
        mlp_dim=4 * width,
        num_layers=depth,
        num_heads=heads,
        proj_type="conv",
        classification=False,
        qkv_bias=True,
    )
    for block in vit.blocks:
        block.attn.use_flash_attention = True
    return vit


def variant(name: str, input_size: Sequence[int], depth: int):
    """``(module, call)`` of one benchmark variant: ``anatomy_<impl>``, ``plain`` or ``monai_vit``."""
    torch.manual_seed(0)
    if name == "monai_vit":
        net = monai_vit(input_size, depth).eval()
        return net, lambda image: net(image[:, :1])
    if name == "plain":
        net = build_encoder(input_size, depth=depth, block_type="plain").eval()
    else:
        net = build_encoder(input_size, depth=depth, attention_impl=name.removeprefix("anatomy_")).eval()
    return net, net


def variants_for(tokens: int, impls: Sequence[str]) -> list[str]:
    names = [f"anatomy_{i}" for i in impls if i != "reference" or tokens <= REFERENCE_MAX_TOKENS]
    return names + ["plain", "monai_vit"]


def interleaved_seconds(calls: dict, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of each call over ``repeats`` rounds; every round runs each call once, in a shuffled order."""
    order, rng = list(calls), random.Random(seed)
    samples = {name: [] for name in calls}
    for name in order:  # warm-up (one-time allocations, kernel selection)
        calls[name]()
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            samples[name].extend(timed(calls[name], torch.device("cpu"), 1, warmup=0))
    return {name: statistics.median(s) for name, s in samples.items()}


def process_memory_mb() -> dict[str, float]:
    """Resident (``VmRSS``) and peak resident (``VmHWM``) memory of this process in MB (Linux ``/proc``)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def reset_peak_memory() -> None:
    """Reset this process's ``VmHWM`` to its current resident size (``clear_refs`` 5, Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def run_child(spec: dict, env: Optional[dict] = None) -> dict:
    """Run `child_main` with ``spec`` in a fresh interpreter (``env`` added to its environment); its JSON result."""
    cmd = [sys.executable, "-m", "scripts.benchmarks.encoder", "--child", json.dumps(spec)]
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode:
        raise RuntimeError(f"benchmark child {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def child_main(spec: dict) -> dict:
    """One forward in this fresh process: resident memory before, peak during, and seconds.

    ``spec``: ``variant``, ``input_size``, ``depth``, ``batch``, ``dtype``, and optionally ``input_file``
    (a saved network input; else a synthetic one).
    """
    torch.manual_seed(0)
    size = spec["input_size"]
    net, call = variant(spec["variant"], size, spec["depth"])
    if spec.get("input_file"):
        image = torch.load(spec["input_file"])
    else:
        image = synthetic_input(spec["batch"], size, "cpu")
    dtype = DTYPES[spec["dtype"]]
    before = process_memory_mb()["VmRSS"]
    reset_peak_memory()
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = call(image)
    seconds = time.perf_counter() - start
    peak = process_memory_mb()["VmHWM"]
    if isinstance(out, (tuple, list)):
        out = out[0]
    return {
        "seconds": round(seconds, 2),
        "rss_before_mb": round(before),
        "peak_rss_mb": round(peak),
        "growth_mb": round(peak - before),
        "output_finite": bool(torch.isfinite(out.float()).all()),
        "threads": torch.get_num_threads(),
    }


def cpu_token_sweep(
    tokens: Sequence[int], depth: int, batch: int, impls: Sequence[str], dtype: str, repeats: int
) -> list[dict]:
    """Time (interleaved, one process) and memory growth (child processes) of every variant at each token count."""
    rows = []
    for n in tokens:
        size = input_for_tokens(n)
        names = variants_for(n, impls)
        image = synthetic_input(batch, size, "cpu")
        calls = {name: inference(variant(name, size, depth)[1], image, "cpu", DTYPES[dtype]) for name in names}
        seconds = interleaved_seconds(calls, repeats)
        del calls, image
        memory, memory_mmap = {}, {}
        for name in names:
            spec = {"variant": name, "input_size": size, "depth": depth, "batch": batch, "dtype": dtype}
            memory[name] = run_child(spec)["growth_mb"]
            memory_mmap[name] = run_child(spec, FIXED_MMAP_THRESHOLD)["growth_mb"]
        rows.append(
            {
                "tokens": n,
                "input_size": list(size),
                "seconds": {k: round(v, 3) for k, v in seconds.items()},
                "memory_growth_mb": memory,
                "memory_growth_mb_fixed_mmap_threshold": memory_mmap,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def data_side(limit: int) -> dict:
    """`scripts.benchmarks.preprocessing` in a child process: volumes/s per worker, warm (cache) and cold."""
    cmd = [sys.executable, "-m", "scripts.benchmarks.preprocessing", "--limit", str(limit)]
    result = subprocess.run(cmd, cwd=BUNDLE_ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    stdout = result.stdout
    figures = json.loads(stdout[stdout.index("{") :])  # the JSON object printed at the end
    return {
        "preprocessing_command": " ".join(["python", *cmd[1:]]),
        "volumes": figures["volumes"],
        "input_size": figures["input_size"],
        "warm_volumes_per_s_per_worker": round(1 / figures["warm_s_per_volume"], 2),
        "cold_volumes_per_s_per_worker": round(1 / figures["cold_s_per_volume"], 2),
        "torch_threads": figures["torch_threads"],
    }


def seed_size_cpu(sample_index: int = 0) -> dict:
    """One forward of the seed configuration on a real sample CT + mask, in a child process.

    The network input is prepared here by `configs/train.json`'s validation chain and HU window (MONAI;
    not timed), saved, and loaded by the child, which builds the seed network with the attention path
    that `configs/train.json` selects on a machine without CUDA.
    """
    from monai.bundle import ConfigParser

    config = ConfigParser()
    config.read_config(str(BUNDLE_ROOT / "configs/train.json"))
    config["bundle_root"] = str(BUNDLE_ROOT)
    impl = config.get_parsed_content("attention_impl")  # as evaluated on this machine (the CPU)
    sample = BUNDLE_ROOT / "tests/data/sample"
    item = json.loads((sample / "datalist.json").read_text())["validation"][sample_index]
    chain = config.get_parsed_content("validate#preprocessing")
    packed = chain({"image": str(sample / item["image"]), "seg": str(sample / item["seg"])})["image"]
    image = config.get_parsed_content("input_window")(packed[None])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.pt"
        torch.save(image.as_subclass(torch.Tensor).clone(), path)  # a plain tensor: the child has no MONAI
        del packed, image
        spec = {
            "variant": f"anatomy_{impl}",
            "input_size": list(SEED_INPUT),
            "depth": 12,
            "batch": 1,
            "dtype": "float32",
            "input_file": str(path),
        }
        result = run_child(spec)
    return {"attention_impl": impl, "ct": item["image"], "input_size": list(SEED_INPUT), **result}


def merge_results(path: Path, sections: dict) -> dict:
    """Update ``path`` (JSON) with ``sections``, keeping sections that were not run this time."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(sections)
    path.write_text(json.dumps(results, indent=4) + "\n")
    return results


def machine() -> dict:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    policy = os.environ.get("OMP_WAIT_POLICY")
    return {"cpu": cpu, "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "omp_wait_policy": policy}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, nargs="*", default=[512, 1024, 2048, 4096], help="CPU sweep (none: skip)")
    parser.add_argument("--depth", type=int, default=2, help="blocks in the CPU sweep (the seed has 12)")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="CPU: one size (1); CUDA: 1 8")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="CPU: float32; CUDA: bfloat16")
    parser.add_argument("--impl", nargs="+", default=None, help="CPU: fused reference; CUDA: fused flex reference")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (CPU) or calls (CUDA)")
    parser.add_argument("--seed-size", action="store_true", help="also the seed-size CPU forward (minutes)")
    parser.add_argument("--data-volumes", type=int, default=10, help="volumes for the data side (0: skip)")
    parser.add_argument("--output-dir", default=str(BUNDLE_ROOT / "docs"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = [f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"] if os.environ.get("OMP_WAIT_POLICY") else []
    command = " ".join([*env, "python -m scripts.benchmarks.encoder", *(argv if argv is not None else sys.argv[1:])])
    stamp = {"command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine()}

    def record(name: str, section: dict) -> None:
        """Merge one finished section into the results and rewrite both files (a later failure loses nothing)."""
        results = merge_results(out_dir / "performance.json", {name: {**stamp, **section}})
        (out_dir / "performance.md").write_text(report.markdown(results))
        print(json.dumps({name: section}), flush=True)

    if args.device == "cuda":
        impls = args.impl or ["fused", "flex", "reference"]
        dtype = DTYPES[args.dtype or "bfloat16"]
        record("cuda", device_figures(torch.device("cuda"), impls, args.batch or [1, 8], dtype, args.repeats))
    else:
        impls = args.impl or ["fused", "reference"]
        batch = (args.batch or [1])[0]
        dtype = args.dtype or "float32"
        if args.tokens:
            rows = cpu_token_sweep(args.tokens, args.depth, batch, impls, dtype, args.repeats)
            sweep = {"depth": args.depth, "batch": batch, "dtype": dtype, "repeats": args.repeats, "rows": rows}
            record("cpu_tokens", sweep)
        if args.data_volumes:
            record("data", data_side(args.data_volumes))
        if args.seed_size:
            record("cpu_seed_size", seed_size_cpu())
    print(f"wrote {out_dir / 'performance.json'} and {out_dir / 'performance.md'}")


if __name__ == "__main__":
    main()
