"""Model Zoo unit test of the ``ct_anatomy_clip`` bundle (the zoo copies it to ``ci/unit_tests/``).

It runs under the zoo's runner (unittest, working directory the zoo root, the bundle in
``models/ct_anatomy_clip``) and under pytest from the bundle root. Each test builds its data in ``setUp``
from the bundle's real sample CTs (``tests/data``), then trains, evaluates and infers with the CPU demo
override, every workflow built by `ConfigWorkflow` and checked with ``check_properties`` before it runs.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import unittest

from monai.bundle import ConfigWorkflow


def _bundle_root() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(here, "configs", "metadata.json")):
        return here  # tests/ of the bundle
    return os.path.abspath(os.path.join("models", "ct_anatomy_clip"))  # ci/unit_tests/ of the Model Zoo


BUNDLE_ROOT = _bundle_root()
SAMPLE_DIR = os.path.join(BUNDLE_ROOT, "tests", "data", "sample")
DICOM_SERIES = os.path.join(BUNDLE_ROOT, "tests", "data", "dicom", "upper_abdomen_series")
CONFIGS = os.path.join(BUNDLE_ROOT, "configs")
TRAIN = [os.path.join(CONFIGS, "train.json"), os.path.join(CONFIGS, "demo.json")]
EVALUATE = TRAIN + [os.path.join(CONFIGS, "evaluate.json")]
INFER = [os.path.join(CONFIGS, "inference.json"), os.path.join(CONFIGS, "demo.json")]
NUM_TRAIN, NUM_VAL = 16, 8  # two batches of the demo's 8 per epoch; validation crops of another patient


def test_order(name1: str, name2: str) -> int:
    """Train before evaluating, evaluate before inferring (the zoo runner sorts the tests with this)."""

    def rank(name: str) -> int:
        return next((i for i, step in enumerate(("train", "infer")) if step in name), 2)

    return rank(name1) - rank(name2)


test_order.__test__ = False  # the zoo runner's sort key, not a test for pytest


def run_checked(workflow: ConfigWorkflow) -> ConfigWorkflow:
    """Initialize, check the workflow's required properties, run and finalize (the zoo's ``check_workflow``)."""
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise ValueError(f"{workflow.workflow_type} workflow lacks required properties: {missing}")
    workflow.run()
    workflow.finalize()
    return workflow


class TestCTAnatomyCLIP(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.models_dir = tempfile.mkdtemp()  # the trained demo model, shared by the tests of this class
        if BUNDLE_ROOT not in sys.path:  # the configs import the bundle's scripts package (as the zoo's tests do)
            sys.path.insert(0, BUNDLE_ROOT)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.models_dir)

    def setUp(self):
        self.work_dir = tempfile.mkdtemp()
        self.dataset_dir = os.path.join(self.work_dir, "pairs")
        with open(os.path.join(SAMPLE_DIR, "datalist.json")) as f:
            sample = json.load(f)
        datalist = {"training": sample["training"][:NUM_TRAIN], "validation": sample["validation"][:NUM_VAL]}
        for item in datalist["training"] + datalist["validation"]:
            for key in ("image", "seg"):
                os.makedirs(os.path.dirname(os.path.join(self.dataset_dir, item[key])), exist_ok=True)
                shutil.copyfile(os.path.join(SAMPLE_DIR, item[key]), os.path.join(self.dataset_dir, item[key]))
        with open(os.path.join(self.dataset_dir, "datalist.json"), "w") as f:
            json.dump(datalist, f, indent=4)
        # inference input: one NIfTI CT with its mask, one DICOM series folder without
        self.cases_dir = os.path.join(self.work_dir, "cases")
        os.makedirs(os.path.join(self.cases_dir, "seg"))
        first = datalist["validation"][0]
        self.nifti_case = os.path.basename(first["image"]).replace(".nii.gz", "")
        shutil.copyfile(
            os.path.join(SAMPLE_DIR, first["image"]), os.path.join(self.cases_dir, f"{self.nifti_case}.nii.gz")
        )
        shutil.copyfile(
            os.path.join(SAMPLE_DIR, first["seg"]), os.path.join(self.cases_dir, "seg", f"{self.nifti_case}.nii.gz")
        )
        shutil.copytree(DICOM_SERIES, os.path.join(self.cases_dir, "series_01"))

    def tearDown(self):
        shutil.rmtree(self.work_dir)

    def _workflow(self, workflow_type: str, config_file: list, **override) -> ConfigWorkflow:
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=config_file,
            meta_file=os.path.join(CONFIGS, "metadata.json"),
            logging_file=os.path.join(CONFIGS, "logging.conf"),
            bundle_root=BUNDLE_ROOT,
            ckpt_dir=self.models_dir,
            **override,
        )

    def _train(self) -> ConfigWorkflow:
        override = {"dataset_dir": self.dataset_dir, "max_epochs": 1, "val_interval": 1}
        override.update(log_dir=os.path.join(self.work_dir, "logs"), cache_dir=os.path.join(self.work_dir, "cache"))
        return run_checked(self._workflow("train", TRAIN, **override))

    def test_train_eval_config(self):
        trainer = self._train()
        loss = trainer.parser.get_parsed_content("train#trainer").state.metrics["train_mean_loss"]
        self.assertTrue(math.isfinite(loss) and loss > 0)
        self.assertTrue(os.path.isfile(os.path.join(self.models_dir, "model.pt")))

        eval_dir = os.path.join(self.work_dir, "eval")
        override = {"dataset_dir": self.dataset_dir, "eval_dir": eval_dir, "n_bootstrap": 10, "num_maps": 1}
        override.update(log_dir=os.path.join(self.work_dir, "logs"), cache_dir=os.path.join(self.work_dir, "cache"))
        # evaluate.json overrides train.json, so the workflow type is "train" (as the zoo's own tests do)
        run_checked(self._workflow("train", EVALUATE, **override))
        with open(os.path.join(eval_dir, "metrics.json")) as f:
            report = json.load(f)
        self.assertEqual(report["cases"], NUM_VAL)
        recall = report["retrieval"]["image_to_text"]["recall@5"]["value"]  # 8 cases: Recall@10 is undefined
        self.assertTrue(0.0 <= recall <= 1.0)

    def test_infer_config(self):
        if not os.path.isfile(os.path.join(self.models_dir, "model.pt")):
            self._train()  # this test run alone
        output_dir = os.path.join(self.work_dir, "out")
        run_checked(self._workflow("infer", INFER, dataset_dir=self.cases_dir, output_dir=output_dir))
        with open(os.path.join(output_dir, "refused.json")) as f:
            self.assertEqual(json.load(f), [])
        from safetensors.torch import load_file

        for case, seg_source in ((self.nifti_case, "given"), ("series_01", "none")):
            embedding = load_file(os.path.join(output_dir, case, "embeddings.safetensors"))["global_embedding"]
            self.assertEqual(tuple(embedding.shape), (128,))  # the demo's projection_dim
            self.assertAlmostEqual(float(embedding.norm()), 1.0, places=4)  # L2-normalised
            with open(os.path.join(output_dir, case, "case.json")) as f:
                self.assertEqual(json.load(f)["seg_source"], seg_source)


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
