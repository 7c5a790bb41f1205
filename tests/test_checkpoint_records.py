"""What training leaves beside its checkpoints (train_config.json, prompt embeddings, thresholds) and the
checks made against it: the ckpt_dir guard, configuration refusals, zero-shot scores without a text model."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import bundle_parser, bundle_workflow
from monai.bundle import ConfigWorkflow
from scripts.data import FINDINGS


def _read_safetensors(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _run(workflow: ConfigWorkflow) -> ConfigWorkflow:
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def labelled_sample(sample_datalist, sample_dir, tmp_path_factory):
    """The sample's training crops and 12 validation crops with alternating CT-RATE labels (absolute paths)."""
    root = tmp_path_factory.mktemp("labelled")
    data = {}
    for section, items in (
        ("training", sample_datalist["training"][:16]),
        ("validation", sample_datalist["validation"][:12]),
    ):
        data[section] = [
            dict(it, image=str(sample_dir / it["image"]), seg=str(sample_dir / it["seg"]),
                 labels=[(i + j) % 2 for j in range(len(FINDINGS))])
            for i, it in enumerate(items)
        ]  # fmt: skip
    (root / "datalist.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def trained(labelled_sample, tiny_bert_dir, tmp_path_factory):
    """A 2-epoch demo training with the tiny BERT, then its evaluation: the files a user's models/ holds."""
    tmp = tmp_path_factory.mktemp("trained")
    common = dict(dataset_dir=str(labelled_sample), text_model_name=str(tiny_bert_dir), ckpt_dir=str(tmp / "models"),
                  log_dir=str(tmp / "logs"), cache_dir=str(tmp / "cache"))  # fmt: skip
    _run(bundle_workflow(("train.json", "demo.json"), "train", max_epochs=2, val_interval=1, **common))
    _run(
        bundle_workflow(("train.json", "demo.json", "evaluate.json"), "infer", n_bootstrap=0,
                        eval_dir=str(tmp / "eval"), num_maps=0, **common)  # fmt: skip
    )
    return tmp, common


def test_training_records_its_configuration_and_the_prompt_embeddings_of_model_pt(bundle_root, trained):
    from safetensors import safe_open
    from scripts.zero_shot import compute_prompt_embeddings, sha256_file

    tmp, common = trained
    models = tmp / "models"
    record = json.loads((models / "train_config.json").read_text())
    assert record["weights"]["embed_dim"] == 64 and record["weights"]["projection_heads"] == ["global"]
    assert record["settings"]["max_epochs"] == 2 and record["text_tower"]["config"]["hidden_size"] == 32
    with safe_open(str(models / "prompt_embeddings.safetensors"), framework="pt") as f:
        meta, prompts, scale = f.metadata(), f.get_tensor("prompt_embedding"), f.get_tensor("logit_scale")
    assert meta["model_sha256"] == sha256_file(models / "model.pt")
    assert meta["prompt_file_sha256"] == sha256_file(bundle_root / "configs/zero_shot_prompts.json")
    assert prompts.shape == (18, 2, 1, 128) and json.loads(meta["findings"]) == list(FINDINGS)
    # the text tower of the best checkpoint (the one model.pt comes from) gives these embeddings
    parser = bundle_parser("train.json", "demo.json")
    parser.update(common)
    clip = parser.get_parsed_content("clip_model")
    clip.load_state_dict(torch.load(models / "model_clip_best.pt", weights_only=True), strict=True)
    assert torch.allclose(
        compute_prompt_embeddings(clip, [("{finding} is present.", "{finding} is not present.")]), prompts, atol=1e-6
    )
    assert float(scale) == pytest.approx(float(clip.logit_scale()))
    thresholds = json.loads((models / "thresholds.json").read_text())
    assert thresholds["model_sha256"] == meta["model_sha256"] and thresholds["cases"] == 12
    assert all(entry["threshold"] is not None for entry in thresholds["findings"].values())


def test_inference_scores_equal_the_evaluation_without_a_text_model(trained, labelled_sample, sample_dir):
    """Zero-shot probabilities at inference (prompt file, no text tower) equal the evaluation's per_case.csv."""
    tmp, common = trained
    cases = tmp / "cases"
    (cases / "seg").mkdir(parents=True)
    validation = json.loads((labelled_sample / "datalist.json").read_text())["validation"][:3]
    for item in validation:
        name = item["case_id"] if "case_id" in item else item["image"].split("/")[-1].split(".")[0]
        (cases / f"{name}.nii.gz").write_bytes(open(item["image"], "rb").read())
        (cases / f"seg/{name}.nii.gz").write_bytes(open(item["seg"], "rb").read())
    out = tmp / "inference"
    _run(bundle_workflow(("inference.json", "demo.json"), "infer", dataset_dir=str(cases), output_dir=str(out),
                         ckpt_dir=common["ckpt_dir"]))  # fmt: skip
    with open(tmp / "eval/per_case.csv") as f:
        evaluated = {row["case_id"]: row for row in csv.DictReader(f)}
    thresholds = json.loads((tmp / "models/thresholds.json").read_text())["findings"]
    for case_id in [p.name.split(".")[0] for p in cases.glob("*.nii.gz")]:
        scores = json.loads((out / case_id / "scores.json").read_text())["findings"]
        for finding in FINDINGS:
            entry = scores[finding]
            assert entry["probability"] == pytest.approx(float(evaluated[case_id][f"p({finding})"]), abs=2e-6)
            assert entry["threshold"] == thresholds[finding]["threshold"]
            assert entry["above_threshold"] == (entry["probability"] > entry["threshold"])
            assert "thresholds.json" in entry["threshold_source"]


def test_changed_prompts_or_other_weights_are_detected(bundle_root, trained, tmp_path):
    from scripts.zero_shot import load_prompt_embeddings, sha256_file

    tmp, _ = trained
    models = tmp / "models"
    prompt_file = bundle_root / "configs/zero_shot_prompts.json"
    prompts, reason = load_prompt_embeddings(
        models / "prompt_embeddings.safetensors", prompt_file, sha256_file(models / "model.pt")
    )
    assert prompts is not None and reason is None
    changed = tmp_path / "prompts.json"
    changed.write_text(json.dumps({"templates": [["{finding} is seen.", "{finding} is not seen."]]}))
    prompts, reason = load_prompt_embeddings(
        models / "prompt_embeddings.safetensors", changed, sha256_file(models / "model.pt")
    )
    assert prompts is None and "changed since" in reason and "prompt_embeddings.json" in reason
    prompts, reason = load_prompt_embeddings(models / "prompt_embeddings.safetensors", prompt_file, "0" * 64)
    assert prompts is None and "made for other weights" in reason


def test_prompt_embedding_step_remakes_the_file_for_an_existing_checkpoint(trained, tmp_path):
    import shutil

    tmp, common = trained
    models = tmp_path / "models"
    shutil.copytree(tmp / "models", models)
    before = _read_safetensors(models / "prompt_embeddings.safetensors")
    (models / "prompt_embeddings.safetensors").unlink()
    _run(
        bundle_workflow(
            ("train.json", "demo.json", "prompt_embeddings.json"), None, **dict(common, ckpt_dir=str(models))
        )
    )
    after = _read_safetensors(models / "prompt_embeddings.safetensors")
    assert after[0] == before[0] and after[1].keys() == before[1].keys()
    assert all(torch.allclose(after[1][k], before[1][k], atol=1e-6) for k in before[1])
    # a checkpoint whose image encoder is not model.pt is refused
    state = torch.load(models / "model.pt", weights_only=True)
    state["norm.weight"] = state["norm.weight"] + 1
    torch.save(state, models / "model.pt")
    with pytest.raises(RuntimeError) as refused:
        _run(
            bundle_workflow(
                ("train.json", "demo.json", "prompt_embeddings.json"), None, **dict(common, ckpt_dir=str(models))
            )
        )
    assert "not from one checkpoint" in str(refused.value.__cause__)


def test_training_never_overwrites_checkpoints_of_another_configuration(trained, tmp_path):
    import shutil

    tmp, common = trained
    models = tmp_path / "models"
    shutil.copytree(tmp / "models", models)
    stamps = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    other = dict(common, ckpt_dir=str(models), embed_dim=32, max_epochs=1)
    with pytest.raises(RuntimeError) as refused:
        _run(bundle_workflow(("train.json", "demo.json"), "train", **other))
    message = str(refused.value.__cause__)
    assert "embed_dim: trained 64, this run 32" in message and f"--ckpt_dir {models}/run-" in message
    assert {p.name: p.stat().st_mtime_ns for p in models.iterdir()} == stamps  # nothing written
    # released weights without a record are protected too
    (models / "train_config.json").unlink()
    with pytest.raises(RuntimeError) as refused:
        _run(bundle_workflow(("train.json", "demo.json"), "train", **dict(common, ckpt_dir=str(models))))
    assert "without a train_config.json" in str(refused.value.__cause__)


def test_same_weights_with_another_schedule_is_not_refused(trained, tmp_path):
    """The guard compares what defines the weights only: a resume or rerun with more epochs, another learning
    rate or batch size passes it and updates the record's settings."""
    import shutil

    from scripts.run_record import claim_ckpt_dir

    tmp, common = trained
    models = tmp_path / "models"
    shutil.copytree(tmp / "models", models)
    parser = bundle_parser("train.json", "demo.json")
    parser.update(dict(common, ckpt_dir=str(models), max_epochs=9, learning_rate=0.01, batch_size=4,
                       attention_impl="reference", gradient_checkpointing=True))  # fmt: skip
    claim_ckpt_dir(models, parser.get_parsed_content("train_record"))
    assert json.loads((models / "train_config.json").read_text())["settings"]["max_epochs"] == 9


def test_a_checkpoint_is_refused_with_a_configuration_that_lacks_its_heads(tmp_path, tiny_bert_dir):
    """Trained with configs/ablation.json, evaluated or run without it: refused, naming heads and overrides."""
    from scripts.run_record import check_checkpoint_config, claim_ckpt_dir

    ablation = bundle_parser("train.json", "demo.json", "ablation.json")
    ablation["text_model_name"] = str(tiny_bert_dir)
    claim_ckpt_dir(tmp_path, ablation.get_parsed_content("train_record"))
    plain = bundle_parser("train.json", "demo.json")
    plain["text_model_name"] = str(tiny_bert_dir)
    text_tower, settings = plain.get_parsed_content("train_record#text_tower"), plain.get_parsed_content("run_settings")
    with pytest.raises(ValueError) as refused:
        check_checkpoint_config(
            tmp_path, plain.get_parsed_content("weights_config"), "evaluation", text_tower, settings
        )
    message = str(refused.value)
    assert "heads this configuration does not build: finding, local, region, segmentation" in message
    assert "region_weight=1.0" in message and "local_weight=0.5" in message and "configs/ablation.json" in message
    inference = bundle_parser("inference.json", "demo.json")
    with pytest.raises(ValueError, match="(?s)inference refused.*finding, local, region, segmentation"):
        check_checkpoint_config(tmp_path, inference.get_parsed_content("weights_config"), "inference", None,
                                inference.get_parsed_content("objective_config"))  # fmt: skip
    inference_ablation = bundle_parser("inference.json", "demo.json", "ablation.json")
    check_checkpoint_config(tmp_path, inference_ablation.get_parsed_content("weights_config"), "inference")


def test_prompt_embedding_writer_follows_model_pt_written_by_this_run_only(tmp_path):
    """A resume keeps the first run's model.pt: the handler must not rewrite its prompt embeddings from a text
    tower of another epoch; once this run saves model.pt, the file follows it."""
    import os

    from scripts.zero_shot import PromptEmbeddingWriter, sha256_file

    class StubCLIP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text_encoder = lambda texts: torch.nn.functional.normalize(torch.ones(len(texts), 4), dim=-1)

        def logit_scale(self):
            return torch.tensor(10.0)

    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text('{"templates": [["{finding} is present.", "{finding} is not present."]]}')
    model = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, model)
    templates = [("{finding} is present.", "{finding} is not present.")]
    writer = PromptEmbeddingWriter(StubCLIP(), templates, str(prompt_file), str(tmp_path))
    writer._seen = writer._stamp()  # what attach() records
    writer(None)
    assert not (tmp_path / "prompt_embeddings.safetensors").exists()  # model.pt from before this run: untouched
    torch.save({"w": torch.ones(1)}, model)
    os.utime(model, ns=(1, 10**18))
    writer(None)
    meta, tensors = _read_safetensors(tmp_path / "prompt_embeddings.safetensors")
    assert meta["model_sha256"] == sha256_file(model) and tensors["prompt_embedding"].shape == (18, 2, 1, 4)
    assert float(tensors["logit_scale"]) == 10.0
