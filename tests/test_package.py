"""The package loads its submodules lazily: the networks need torch only; configs still reach everything.

Both checks run in a fresh interpreter, where nothing of ``scripts`` has been imported yet.
"""

import json
import subprocess
import sys

from conftest import BUNDLE_ROOT


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_networks_import_without_monai_or_transformers():
    out = _run(
        "import sys, scripts.networks\n"
        "from scripts.networks import AnatomyAwareCTEncoder\n"
        "print(sorted(m for m in ('monai', 'ignite', 'nibabel', 'transformers') if m in sys.modules))\n"
    )
    assert out == "[]"


def test_config_expressions_reach_submodules_after_import_scripts():
    """``$import scripts`` then ``$scripts.evaluation...`` and ``$scripts.data...``, as the configs write them."""
    out = _run(
        "import json, sys\n"
        "from monai.bundle import ConfigParser\n"
        "parser = ConfigParser()\n"
        "parser.read_config(['configs/train.json', 'configs/evaluate.json'])\n"
        "loaded = 'scripts.evaluation' in sys.modules\n"
        "prompts = parser.get_parsed_content('zero_shot_prompts')\n"  # $scripts.evaluation.load_prompt_templates
        "parser['expr'] = '$scripts.data.parse_volume_name'\n"
        "print(json.dumps([loaded, len(prompts), parser.get_parsed_content('expr').__module__]))\n"
    )
    loaded_before_use, num_prompts, module = json.loads(out)
    expected = json.loads((BUNDLE_ROOT / "configs/zero_shot_prompts.json").read_text())["templates"]
    assert not loaded_before_use and num_prompts == len(expected) and module.startswith("scripts.data")


def test_unknown_attribute_is_an_attribute_error():
    import scripts

    assert "networks" in dir(scripts) and "evaluation" in dir(scripts)
    assert not hasattr(scripts, "no_such_module")
