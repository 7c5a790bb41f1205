"""The anatomical region map: TotalSegmentator v2 classes grouped into the encoder's regions.

`configs/regions.json` lists the regions in order (region index = list position + 1, 0 is background);
each names the TotalSegmentator v2 ``total`` classes it gathers. Class names are resolved to label ids
through the class map file beside it (`configs/totalsegmentator_v2_classes.json`, ids 1..117, from
https://github.com/wasserth/TotalSegmentator, Apache-2.0).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RegionMap:
    """Regions of the anatomy encoder.

    Attributes:
        names: ``R`` region names (snake case), region index ``r`` is ``names[r - 1]``.
        labels: ``R`` human-readable region names for text ("left upper lobe of the lung").
        class_ids: ``R`` lists of TotalSegmentator v2 label ids gathered by each region.
        class_names: the TotalSegmentator v2 class map, label id -> class name.
    """

    names: tuple[str, ...]
    labels: tuple[str, ...]
    class_ids: tuple[tuple[int, ...], ...]
    class_names: dict[int, str]

    @property
    def num_regions(self) -> int:
        return len(self.names)

    @property
    def max_class_id(self) -> int:
        """The largest label id of the class map (117 for TotalSegmentator v2)."""
        return max(self.class_names)


def load_region_map(path: str | Path) -> RegionMap:
    """Read a region map JSON and resolve its TotalSegmentator class names to label ids.

    Args:
        path: the region map, e.g. ``configs/regions.json``; its ``class_map`` entry names the class map
            JSON (label id -> class name) relative to the region map's folder.

    Raises:
        ValueError: a class name that the class map does not know, a class listed in two regions,
            or a region without classes. The message names the file.
    """
    path = Path(path)
    spec = json.loads(path.read_text())
    class_map_path = path.parent / spec["class_map"]
    class_names = {int(k): v for k, v in json.loads(class_map_path.read_text()).items()}
    id_of = {name: label_id for label_id, name in class_names.items()}
    seen: dict[int, str] = {}
    names, labels, class_ids = [], [], []
    for region in spec["regions"]:
        ids = []
        for cls in region["totalsegmentator_classes"]:
            if cls not in id_of:
                raise ValueError(f"{path}: region {region['name']!r} names class {cls!r}, unknown to {class_map_path}")
            if id_of[cls] in seen:
                raise ValueError(f"{path}: class {cls!r} is in regions {seen[id_of[cls]]!r} and {region['name']!r}")
            seen[id_of[cls]] = region["name"]
            ids.append(id_of[cls])
        if not ids:
            raise ValueError(f"{path}: region {region['name']!r} lists no TotalSegmentator class")
        names.append(region["name"])
        labels.append(region["label"])
        class_ids.append(tuple(ids))
    return RegionMap(tuple(names), tuple(labels), tuple(class_ids), class_names)
