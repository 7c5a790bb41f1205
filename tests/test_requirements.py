"""The optional MONAI Label environment installs the bundle's own pins (all but torch, which it must replace)."""

from __future__ import annotations

import re

from conftest import BUNDLE_ROOT


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (BUNDLE_ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            package, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", package).lower()] = version
    return pins


def test_label_requirements_repeat_the_bundle_pins_but_torch():
    bundle, label = _pins("requirements.txt"), _pins("requirements-label.txt")
    assert bundle.pop("torch") == "2.13.0" and label["torch"] == "2.14.1" and label["torchvision"] == "0.29.1"
    assert {name: label.get(name) for name in bundle} == bundle
