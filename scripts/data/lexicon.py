"""Which anatomical regions a report sentence names: a term lexicon with synonyms and laterality."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from scripts.anatomy_regions import RegionMap

_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class _Term:
    pattern: re.Pattern
    regions: tuple[int, ...]  # 0-based region indices
    sides: tuple[str | None, ...]  # side of each region, None for midline organs
    fixed_side: bool  # abbreviations carry their side
    broad: bool


class RegionLexicon:
    """Assign report sentences to the regions of `configs/regions.json`.

    The lexicon file (`configs/region_lexicon.json`) lists, per region, its terms and abbreviations and
    its side (``left``, ``right`` or ``null``), plus broad terms that name a whole group of regions
    ("lung", "pleural"). Matching, per sentence (case-insensitive, whole words):

    1. terms are matched longest first; a matched span is not matched again ("pulmonary veins" is not
       also "pulmonary");
    2. a lateral term keeps the regions of the side named by the side words within ``side_window``
       words before it (or, when there are none before, after it: "lower lobe of the left lung"):
       only "left" -> left, only "right" -> right; both sides, "bilateral"/"both", or no side word ->
       every region of the term ("both lower lobes" -> the two lower lobes);
    3. broad terms count only when no specific term of their group matched in the sentence, so
       "nodule in the lower lobe of the left lung" names the left lower lobe alone.

    A sentence is *normal* when it matches one of the lexicon's ``normal_patterns`` ("... is normal",
    "no ... detected", CT-RATE's "... were observed as natural").

    Raises:
        ValueError: the lexicon names a region that the region map does not have (message names the file).
    """

    def __init__(self, spec: dict, region_map: RegionMap, source: str = "<lexicon>") -> None:
        index = {name: i for i, name in enumerate(region_map.names)}
        for name in list(spec["regions"]) + [n for group in spec.get("broad_terms", []) for n in group["regions"]]:
            if name not in index:
                raise ValueError(f"{source}: region {name!r} is not in the region map {region_map.names}")
        side_of = {name: spec["regions"].get(name, {}).get("side") for name in region_map.names}
        self.region_names = region_map.names
        self.side_words = {w.lower(): s for w, s in spec["side_words"].items()}
        self.side_window = int(spec["side_window"])
        self.normal_patterns = [re.compile(p, re.IGNORECASE) for p in spec.get("normal_patterns", [])]
        collected: dict[tuple[str, bool, bool], list[int]] = {}
        for name, entry in spec["regions"].items():
            for term in entry.get("terms", []):
                collected.setdefault((term.lower(), False, False), []).append(index[name])
            for abbreviation in entry.get("abbreviations", []):
                collected.setdefault((abbreviation.lower(), True, False), []).append(index[name])
        for group in spec.get("broad_terms", []):
            for term in group["terms"]:
                collected.setdefault((term.lower(), False, True), []).extend(index[n] for n in group["regions"])
        terms = []
        for (text, fixed_side, broad), regions in collected.items():
            regions = tuple(sorted(set(regions)))
            words = r"\s+".join(re.escape(w) for w in text.split())
            terms.append(
                _Term(
                    re.compile(rf"\b{words}\b"),
                    regions,
                    tuple(side_of[self.region_names[r]] for r in regions),
                    fixed_side,
                    broad,
                )
            )
        self._terms = sorted(terms, key=lambda t: -len(t.pattern.pattern))  # longest first
        self._broad_groups = [set(t.regions) for t in self._terms if t.broad]

    @classmethod
    def from_file(cls, path: str | Path, region_map: RegionMap) -> RegionLexicon:
        """Load `configs/region_lexicon.json` (or another file of the same layout)."""
        return cls(json.loads(Path(path).read_text()), region_map, source=str(path))

    def _side_near(self, words: list[tuple[int, int, str]], start: int, end: int) -> str | None:
        """Side named by the side words within ``side_window`` words before the span ``[start, end)``, or
        (when there are none before) after it; ``None`` for both sides or none."""
        before = [w[2] for w in words if w[1] <= start][-self.side_window :]
        after = [w[2] for w in words if w[0] >= end][: self.side_window]
        for window in (before, after):
            found = {self.side_words[w] for w in window if w in self.side_words}
            if found:
                return None if "both" in found or {"left", "right"} <= found else found.pop()
        return None

    def regions_of(self, sentence: str) -> list[int]:
        """0-based indices (sorted) of the regions a sentence names."""
        text = sentence.lower()
        words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
        taken: list[tuple[int, int]] = []
        specific: set[int] = set()
        broad: set[int] = set()
        for term in self._terms:
            for match in term.pattern.finditer(text):
                start, end = match.span()
                if any(start < b and a < end for a, b in taken):
                    continue
                taken.append((start, end))
                side = None if term.fixed_side else self._side_near(words, start, end)
                chosen = {r for r, s in zip(term.regions, term.sides) if side is None or s is None or s == side}
                (broad if term.broad else specific).update(chosen)
        for group in self._broad_groups:
            if group & specific:
                broad -= group
        return sorted(specific | broad)

    def is_normal(self, sentence: str) -> bool:
        """Whether a sentence reads as a normal finding (matches one of the normal patterns)."""
        return any(p.search(sentence) for p in self.normal_patterns)
