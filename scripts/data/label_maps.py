"""TotalSegmentator label maps: the label table a mask carries, its ids, and whether they look like anatomy.

TotalSegmentator (https://github.com/wasserth/TotalSegmentator) writes the class table of a multi-label
mask into a NIfTI header extension (Caret XML: ``<Label Key="5">liver</Label>``). The v1 (104 classes) and
v2 (117 classes) numberings differ (v1 7 = aorta, v2 7 = pancreas), so a mask's ids mean nothing until
its table, or a plausibility check on the CT under it, says which numbering it uses.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ElementTree
from collections.abc import Hashable, Mapping

import nibabel as nib
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from .transforms import BadCaseError, source_name

logger = logging.getLogger(__name__)

# v2 classes for the plausibility check: the lung lobes together are air-filled (median well below -400 HU),
# each solid organ is not
LUNG_LOBES = (10, 11, 12, 13, 14)
SOLID = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver", 15: "esophagus", 17: "thyroid_gland"}
SOLID.update({25: "sacrum", 51: "heart", 52: "aorta"})


def read_label_table(path: str) -> dict[int, str] | None:
    """The ``{label id: class name}`` table in a NIfTI's header extensions, ``None`` when it carries none.

    Reads the header only. Raises ``ValueError`` (naming the file) for a table that is not valid XML.
    """
    for extension in nib.load(path).header.extensions:
        content = extension.get_content()
        if isinstance(content, bytes) and b"<LabelTable>" in content:
            text = content.rstrip(b"\x00 \t\r\n")
            try:
                root = ElementTree.fromstring(text)
            except ElementTree.ParseError as err:
                raise ValueError(f"{path}: label table in the header extension is not valid XML: {err}") from err
            return {int(label.get("Key")): (label.text or "").strip() for label in root.iter("Label")}
    return None


class CheckLabelIdsd(MapTransform):
    """Make sure a label map is numbered as TotalSegmentator v2 before its ids are read as anatomy.

    1. **Label table** (`read_label_table`): where the mask's file carries one, each id present in the mask
       is looked up by name in ``class_names``. Ids whose names the v2 table gives other ids (a v1 mask:
       7 aorta becomes 52) are mapped to v2 and the mapping is logged once per file; a name that v2 does not
       know (``heart_myocardium``) refuses the case. A mask without a table is logged as unverifiable (a
       warning for the first such file, then at DEBUG per file).
    2. **Ids**: values outside ``[0, max id]`` or not whole (a probability map) refuse the case. Run this
       before the mask is cast to a compact integer type (a cast would wrap 318 to 62, a real organ).
       An empty mask (all background) is accepted, logged once per file: no region tokens.

    Args:
        keys: the label key.
        class_names: the v2 class table ``{id: name}`` (``RegionMap.class_names``).

    Raises:
        BadCaseError: the message names the file and the offending ids or names.
    """

    def __init__(self, keys: KeysCollection, class_names: Mapping[int, str]) -> None:
        super().__init__(keys)
        self.class_names = {int(k): str(v) for k, v in class_names.items()}
        self.id_of = {v: k for k, v in self.class_names.items()}
        self.max_id = max(self.class_names)
        self._logged: set[tuple[str, str]] = set()  # (file, what) logged in this process
        self._unverifiable_warned = False

    def _check_table(self, labels: torch.Tensor, name: str) -> torch.Tensor:
        try:
            table = read_label_table(name) if name.endswith((".nii", ".nii.gz")) else None
        except ValueError as err:
            raise BadCaseError(str(err)) from err
        if table is None:
            if (name, "no table") not in self._logged:
                level = logging.DEBUG if self._unverifiable_warned else logging.WARNING
                self._unverifiable_warned = True
                self._logged.add((name, "no table"))
                logger.log(
                    level,
                    f"{name}: the mask carries no label table; its ids are taken as TotalSegmentator v2 unverified"
                    + (" (further masks without a table are logged at DEBUG)" if level == logging.WARNING else ""),
                )
            return labels
        present = [int(v) for v in torch.unique(labels).tolist() if v != 0 and float(v).is_integer()]
        unknown = [f"{i} {table[i]!r}" for i in present if i in table and table[i] not in self.id_of]
        if unknown:
            raise BadCaseError(
                f"{name}: its label table names classes that TotalSegmentator v2 does not have ({', '.join(unknown[:8])}); "
                "a mask of another class set (TotalSegmentator v1?) cannot be mapped"
            )
        mapping = {i: self.id_of[table[i]] for i in present if i in table and self.id_of[table[i]] != i}
        if not mapping:
            return labels
        if (name, "mapped") not in self._logged:
            self._logged.add((name, "mapped"))
            shown = ", ".join(f"{i} {table[i]} -> {j}" for i, j in list(mapping.items())[:8])
            logger.warning(f"{name}: label table differs from TotalSegmentator v2; ids mapped by name: {shown}")
        lut = torch.arange(max(int(labels.max()) + 1, self.max_id + 1), dtype=torch.long)
        for i, j in mapping.items():
            lut[i] = j
        return lut[labels.long()].to(labels.dtype)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.keys:
            arr = d[key]
            name = source_name(arr)
            labels = arr.as_tensor() if hasattr(arr, "as_tensor") else torch.as_tensor(arr)
            low, high = float(labels.min()), float(labels.max())
            if low < 0 or high > self.max_id or not torch.equal(labels, labels.round()):
                found = torch.unique(labels)[:10].tolist()
                raise BadCaseError(
                    f"{name}: label values in [{low:g}, {high:g}] (first: {found}) are not "
                    f"TotalSegmentator v2 ids 0..{self.max_id}"
                )
            if not getattr(arr, "meta", {}).get("no_label_map", False):
                if high == 0 and (name, "empty") not in self._logged:
                    self._logged.add((name, "empty"))
                    logger.warning(f"{name}: the mask is empty (all background); the case trains without region tokens")
                mapped = self._check_table(labels, name)
                if mapped is not labels:
                    d[key] = arr.clone()
                    d[key].copy_(mapped)
        return d


class CheckLabelPlausibilityd(MapTransform):
    """Refuse a mask whose ids do not look like TotalSegmentator v2 on its CT; needs no header.

    The five lung lobes together (v2 ids 10-14) must have a median below ``threshold_hu`` and each solid
    class (liver, spleen, kidneys, esophagus, thyroid, sacrum, heart, aorta) a median above it, each
    checked where it covers at least ``min_voxels`` voxels. A TotalSegmentator v1 mask read as v2 fails
    (v1 10-12 are pancreas and adrenals; v1 15 and 17 are lung lobes where v2 has esophagus and
    thyroid), and so does the mask of another CT. The lobes are judged together so that a consolidated
    or collapsed lobe (real pathology) is not refused; only a lung field that is mostly not air is.
    Run after `CheckSameGridd` and `RescaleToHUd` (same grid, HU).

    Args:
        keys: ``(image_key, label_key)``.
        threshold_hu: the split between air-filled and solid, HU.
        min_voxels: the least number of voxels of a class that is checked.

    Raises:
        BadCaseError: names the mask, the CT, the class and its median HU.
    """

    def __init__(self, keys: KeysCollection, threshold_hu: float = -400.0, min_voxels: int = 200) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"CheckLabelPlausibilityd takes (image_key, label_key), got {self.keys}")
        self.threshold_hu = float(threshold_hu)
        self.min_voxels = int(min_voxels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        image, label = (data[k] for k in self.keys)
        hu, ids = torch.as_tensor(image).float().flatten(), torch.as_tensor(label).flatten()
        groups = [(torch.isin(ids, torch.tensor(LUNG_LOBES)), "10-14 (lung lobes)", True)]
        groups += [(ids == class_id, f"{class_id} ({name})", False) for class_id, name in SOLID.items()]
        for voxels, what, air in groups:
            if int(voxels.sum()) < self.min_voxels:
                continue
            median = float(hu[voxels].median())
            if (median < self.threshold_hu) != air:
                raise BadCaseError(
                    f"{source_name(label)}: voxels labelled {what} have median {median:.0f} HU in "
                    f"{source_name(image)}, implausible for {'air-filled lungs' if air else 'a solid organ'}: "
                    "a mask numbered another way (TotalSegmentator v1?) or made on another CT"
                )
        return dict(data)
