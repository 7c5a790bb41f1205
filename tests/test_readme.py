"""The README's commands as a user runs them (CPU-sized, offline)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

from safetensors import safe_open


def _readme_block(bundle_root, marker: str) -> list[str]:
    """The commands of the first ```bash block after ``marker`` in README.md, continuation lines joined."""
    text = (bundle_root / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(marker) :], re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_cpu_sized_training_on_your_data_runs_offline_as_written(bundle_root, sample_datalist, sample_dir, tmp_path):
    """Four training and two validation crops as a user's datalist; the README's two commands, unchanged apart
    from the folder names, train, record the configuration and infer."""
    data = tmp_path / "my_data"
    datalist = {}
    for section, items in (
        ("training", sample_datalist["training"][:4]),
        ("validation", sample_datalist["validation"][:2]),
    ):
        datalist[section] = [{k: it[k] for k in ("image", "seg", "text", "study")} for it in items]
        for it in items:
            for key in ("image", "seg"):
                (data / it[key]).parent.mkdir(parents=True, exist_ok=True)
                (data / it[key]).write_bytes((sample_dir / it[key]).read_bytes())
    (data / "datalist.json").write_text(json.dumps(datalist))
    commands = _readme_block(bundle_root, "**A CPU-sized run first (offline).**")
    assert len(commands) == 2 and all(c.startswith("python -m monai.bundle run") for c in commands)
    for command in commands:
        for name in ("models/cpu_run", "cache/cpu_run", "eval/cpu_run"):
            command = command.replace(name, str(tmp_path / name))
        argv = [sys.executable] + shlex.split(command.replace("DIR", str(data)))[1:]
        done = subprocess.run(argv, cwd=bundle_root, capture_output=True, text=True)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    models = tmp_path / "models/cpu_run"
    assert {"model.pt", "model_clip.pt", "train_config.json", "prompt_embeddings.safetensors"} <= {
        p.name for p in models.iterdir()
    }
    assert json.loads((models / "train_config.json").read_text())["settings"]["batch_size"] == 2
    out = tmp_path / "eval/cpu_run"
    assert json.loads((out / "refused.json").read_text()) == []
    for item in sample_datalist["validation"][:2]:
        case_id = item["image"].split("/")[-1].split(".")[0]
        with safe_open(str(out / case_id / "embeddings.safetensors"), framework="pt") as f:
            assert f.get_tensor("global_embedding").shape == (128,)
        scores = json.loads((out / case_id / "scores.json").read_text())["findings"]
        assert all(0 <= s["probability"] <= 1 for s in scores.values())  # prompt embeddings written by training
