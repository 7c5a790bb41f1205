"""`docs/performance.md` from `docs/performance.json` (written by `python -m scripts.benchmarks.encoder`)."""

from typing import Optional

GPU_COMMAND = "python -m scripts.benchmarks.encoder --device cuda"
CPU_COMMAND = "python -m scripts.benchmarks.encoder --seed-size"
ANATOMY = "anatomy_fused"


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return round(a / b, 2) if a is not None and b else None


def _fmt(value, unit: str = "", missing: str = "unmeasured") -> str:
    if value is None:
        return missing
    return f"{value:.2f}x" if unit == "x" else f"{value}{unit}"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _cpu_row(rows: list[dict], tokens: int) -> Optional[dict]:
    return next((r for r in rows if r["tokens"] == tokens), None)


def cpu_ratios(row: dict, impl: str = ANATOMY) -> dict:
    """Time and memory ratios of the anatomy encoder (``impl``) to the plain encoder and to MONAI's ViT."""
    seconds, memory = row["seconds"], row["memory_growth_mb"]
    fixed = row.get("memory_growth_mb_fixed_mmap_threshold", {})
    return {
        "time_vs_plain": _ratio(seconds.get(impl), seconds.get("plain")),
        "time_vs_monai_vit": _ratio(seconds.get(impl), seconds.get("monai_vit")),
        "memory_vs_plain": _ratio(memory.get(impl), memory.get("plain")),
        "memory_vs_monai_vit": _ratio(memory.get(impl), memory.get("monai_vit")),
        "memory_vs_plain_fixed_mmap": _ratio(fixed.get(impl), fixed.get("plain")),
        "memory_vs_monai_vit_fixed_mmap": _ratio(fixed.get(impl), fixed.get("monai_vit")),
    }


def _verdict(value: Optional[float], limit: float, higher_is_better: bool = False) -> str:
    if value is None:
        return "unmeasured"
    ok = value >= limit if higher_is_better else value <= limit
    return "met" if ok else "**not met**"


def _targets(results: dict) -> list[str]:
    lines = ["## Targets (issue 11)", "", _row(["measure", "target", "measured", "status"]), _row(["---"] * 4)]
    cuda = results.get("cuda") or {}
    fused = next((f for f in cuda.get("forward", []) if f["attention_impl"] == "fused"), None)
    latency = fused["batches"].get("1", {}).get("latency_ms") if fused else None
    throughput = fused["batches"].get("8", {}).get("volumes_per_s") if fused else None
    train = cuda.get("training_step") or {}
    lines.append(
        _row(
            ["forward, seed config, 1 volume, bf16, one H200", "<= 25 ms", _fmt(latency, " ms"), _verdict(latency, 25)]
        )
    )
    lines.append(
        _row(
            [
                "inference throughput, batch 8, one H200",
                ">= 40 vol/s",
                _fmt(throughput, " vol/s"),
                _verdict(throughput, 40, True),
            ]
        )
    )
    vols, mem = train.get("volumes_per_s"), train.get("peak_memory_gb")
    lines.append(
        _row(
            [
                "training, batch 8, checkpointing, bf16, one H200",
                ">= 6 vol/s, <= 16 GB",
                f"{_fmt(vols, ' vol/s')}, {_fmt(mem, ' GB')}",
                _verdict(vols, 6, True) if mem is None else f"{_verdict(vols, 6, True)} / {_verdict(mem, 16)}",
            ]
        )
    )
    rows = (results.get("cpu_tokens") or {}).get("rows", [])
    for tokens in (2048, 4096):
        row = _cpu_row(rows, tokens)
        ratios = cpu_ratios(row) if row else {}
        t, m = ratios.get("time_vs_plain"), ratios.get("memory_vs_plain")
        m_fixed = ratios.get("memory_vs_plain_fixed_mmap")
        lines.append(
            _row(
                [
                    f"anatomy vs plain encoder, CPU, {tokens:,} tokens",
                    "<= 1.5x time, <= 1.2x memory",
                    f"{_fmt(t, 'x')} time; memory {_fmt(m, 'x')} (glibc default), {_fmt(m_fixed, 'x')} "
                    "(1 MB mmap threshold)",
                    f"{_verdict(t, 1.5)} / {_verdict(m, 1.2)}, {_verdict(m_fixed, 1.2)}",
                ]
            )
        )
    for tokens in (2048, 4096):
        row = _cpu_row(rows, tokens)
        t = cpu_ratios(row).get("time_vs_monai_vit") if row else None
        lines.append(
            _row(
                [
                    f"anatomy encoder vs MONAI ViT (SDPA), CPU, {tokens:,} tokens",
                    "<= 1.5x time",
                    f"{_fmt(t, 'x')}",
                    _verdict(t, 1.5),
                ]
            )
        )
    seed = results.get("cpu_seed_size") or {}
    s, peak = seed.get("seconds"), seed.get("peak_rss_mb")
    peak_gb = round(peak / 1000, 2) if peak is not None else None
    lines.append(
        _row(
            [
                "seed-size CPU inference, 1 volume, 2 cores",
                "<= 300 s, <= 4 GB",
                f"{_fmt(s, ' s')}, {_fmt(peak_gb, ' GB')} peak RSS",
                f"{_verdict(s, 300)} / {_verdict(peak_gb, 4)}",
            ]
        )
    )
    return lines + [""]


def _pair(a, b, unit: str = "") -> str:
    return f"{_fmt(a, unit, '-')} / {_fmt(b, unit, '-')}"


def _cpu_section(section: dict) -> list[str]:
    rows = section["rows"]
    names = list(rows[-1]["seconds"]) if rows else []
    machine = section["machine"]
    lines = [
        "## CPU: anatomy encoder vs plain encoder vs MONAI ViT",
        "",
        f"Command: `{section['command']}` ({section['date']}; {machine['cpu']}, {machine['torch_threads']} "
        f"threads, torch {machine['torch']}). Width 768, 12 heads, patch (4, 16, 16), depth {section['depth']}, "
        f"batch {section['batch']}, {section['dtype']}, inference, random label ids; patch grid 16 x Y x X. "
        "`anatomy_fused` / `anatomy_reference`: the bundle's encoder with that attention path (the reference "
        "path is not run above 4,096 tokens); `plain`: the same encoder with plain ViT blocks "
        '(`block_type="plain"`); `monai_vit`: `monai.networks.nets.ViT` of the same size with its SDPA path '
        '(`use_flash_attention`) switched on. "anatomy" in the ratios is `anatomy_fused`.',
        "",
        f"Time: medians of {section['repeats']} rounds, run interleaved in one process in a shuffled order "
        "each round. The machine is shared with other programs and noisy (two cores, several jobs): the "
        "ratios, where every variant met the same load, say more than the seconds. Under such load "
        "libgomp's default waiting makes every two-thread parallel region wait for a descheduled thread, "
        "which inflates small operations many times over and penalises the encoder with more of them; "
        f"`OMP_WAIT_POLICY` was `{machine.get('omp_wait_policy')}` in this run.",
        "",
        _row(["tokens", "input (D, H, W)", *[f"{n} s" for n in names], "anatomy / plain", "anatomy / MONAI ViT"]),
        _row(["---"] * (4 + len(names))),
    ]
    for row in rows:
        ratios = cpu_ratios(row)
        lines.append(
            _row(
                [
                    f"{row['tokens']:,}",
                    " x ".join(str(s) for s in row["input_size"]),
                    *[_fmt(row["seconds"].get(n), missing="-") for n in names],
                    _fmt(ratios["time_vs_plain"], "x", "-"),
                    _fmt(ratios["time_vs_monai_vit"], "x", "-"),
                ]
            )
        )
    lines += [
        "",
        "Memory: growth of the peak resident memory (`VmHWM`) over the resident memory before one forward, "
        "each variant in a fresh process, in MB, as `glibc default / 1 MB mmap threshold`. With glibc's "
        "default the mmap threshold grows as large blocks are freed, and later tensors come from a heap that "
        "fragments, so the peak depends on the order of allocations; with `MALLOC_MMAP_THRESHOLD_=1048576` "
        "every tensor above 1 MB is mapped and returned on free, and the peak follows the live tensors.",
        "",
        _row(["tokens", *[f"{n} MB" for n in names], "anatomy / plain", "anatomy / MONAI ViT"]),
        _row(["---"] * (3 + len(names))),
    ]
    for row in rows:
        ratios = cpu_ratios(row)
        fixed = row.get("memory_growth_mb_fixed_mmap_threshold", {})
        lines.append(
            _row(
                [
                    f"{row['tokens']:,}",
                    *[_pair(row["memory_growth_mb"].get(n), fixed.get(n)) for n in names],
                    _pair(ratios["memory_vs_plain"], ratios["memory_vs_plain_fixed_mmap"], "x"),
                    _pair(ratios["memory_vs_monai_vit"], ratios["memory_vs_monai_vit_fixed_mmap"], "x"),
                ]
            )
        )
    return lines + [""]


def _seed_section(seed: Optional[dict]) -> list[str]:
    lines = ["## Seed-size inference on the CPU", ""]
    if not seed:
        return lines + [f"Unmeasured: run `{CPU_COMMAND}`.", ""]
    return lines + [
        f"Command: `{seed['command']}` ({seed['date']}; {seed['machine']['cpu']}, {seed['threads']} threads). "
        f"The `network_def` of `configs/train.json` as built on a CPU (`attention_impl` `{seed['attention_impl']}`, "
        f"12 blocks, width 768), float32, inference, on a crop of a real CT + mask (`tests/data/sample/{seed['ct']}`, "
        "prepared by the validation chain at 0.75 x 0.75 x 5 mm and padded to 64 x 512 x 512; loading and "
        "resampling not timed), in a fresh process.",
        "",
        _row(["forward", "peak resident memory (whole process)", "resident before the forward", "output finite"]),
        _row(["---"] * 4),
        _row(
            [f"{seed['seconds']} s", f"{seed['peak_rss_mb']} MB", f"{seed['rss_before_mb']} MB", seed["output_finite"]]
        ),
        "",
    ]


def _data_section(data: Optional[dict]) -> list[str]:
    lines = ["## Data side", ""]
    if not data:
        return lines + ["Unmeasured.", ""]
    return lines + [
        f"Command: `{data['command']}` ({data['date']}), which runs `{data['preprocessing_command']}`: "
        f"it reads {data['volumes']} sample volumes through `configs/train.json`'s training chain "
        f"(input {data['input_size']}) with a fresh cache: one worker delivers "
        f"**{data['warm_volumes_per_s_per_worker']} volumes/s** from the preprocessing cache (cold, filling "
        f"the cache: {data['cold_volumes_per_s_per_worker']} volumes/s). With `num_workers` workers the "
        "loader delivers about that many times more, to compare with the training rate below. These are "
        "the bundled sample crops (padded to the input size); whole CT-RATE volumes cost more to load cold, "
        "and the warm read is what a training epoch after the first sees.",
        "",
    ]


def _cuda_section(cuda: Optional[dict]) -> list[str]:
    lines = ["## GPU (one H200)", ""]
    if not cuda:
        return lines + [
            "**Unmeasured**: no GPU was available to this work. On the GPU machine, from the bundle root "
            "(it imports only torch and `scripts.networks`; a `transformers` BERT-base is used for the text "
            "tower when installed, else a plain-torch stand-in of the same size):",
            "",
            "```bash",
            GPU_COMMAND,
            "```",
            "",
            "It measures, for every attention path (`fused`, `flex`, `reference`), bf16 autocast, the seed "
            "configuration at 64 x 512 x 512: forward latency at batch 1, volumes/s at batch 1 and 8, peak "
            "memory, model-FLOPs utilisation against the bf16 matmul rate measured in the same run; and one "
            "training step (forward + backward + AdamW, checkpointing on, batch 8, a randomly initialised "
            "BERT-base-size text tower at 512 tokens): volumes/s, peak memory, utilisation.",
            "",
        ]
    lines += [
        f"Command: `{cuda['command']}` ({cuda['date']}; {cuda['device']}, torch {cuda['torch']}, {cuda['dtype']}; "
        f"measured bf16 matmul rate {cuda['matmul_tflops']} TFLOP/s, the utilisation denominator).",
        "",
        _row(["attention path", "batch", "latency ms", "volumes/s", "peak memory GB", "model-FLOPs utilisation"]),
        _row(["---"] * 6),
    ]
    for entry in cuda["forward"]:
        for batch, fig in entry["batches"].items():
            lines.append(
                _row(
                    [
                        entry["attention_impl"],
                        batch,
                        fig["latency_ms"],
                        fig["volumes_per_s"],
                        fig["peak_memory_gb"],
                        fig.get("model_flops_utilisation", "-"),
                    ]
                )
            )
    t = cuda["training_step"]
    lines += [
        "",
        f"Training step (batch {t['batch']}, text tower `{t['text_tower']}` {t['text_parameters_m']} M parameters at "
        f"{t['text_tokens']} tokens, image encoder {t['image_parameters_m']} M): {t['volumes_per_s']} volumes/s, "
        f"peak memory {t['peak_memory_gb']} GB, model-FLOPs utilisation {t.get('model_flops_utilisation', '-')} "
        f"({t['model_tflops_per_step']} TFLOP per step).",
        "",
    ]
    return lines


def markdown(results: dict) -> str:
    """The whole ``performance.md`` for ``results`` (the contents of ``performance.json``)."""
    lines = [
        "# Performance",
        "",
        "Every figure here comes from `python -m scripts.benchmarks.encoder` (this file and "
        "`docs/performance.json` are written by it; sections not rerun are kept). Targets are benchmarks, "
        "not tests.",
        "",
    ]
    lines += _targets(results)
    if results.get("cpu_tokens"):
        lines += _cpu_section(results["cpu_tokens"])
    lines += _seed_section(results.get("cpu_seed_size"))
    lines += _data_section(results.get("data"))
    lines += _cuda_section(results.get("cuda"))
    return "\n".join(lines)
