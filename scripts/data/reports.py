"""Radiology report text: assembling the training text and splitting it into sentences."""

from __future__ import annotations

from functools import lru_cache

import pysbd


def assemble_report(findings: str | None, impressions: str | None) -> str:
    """The training text of a report: ``"Findings: ... Impression: ..."``, skipping empty sections.

    CT-RATE's ``Findings_EN`` and ``Impressions_EN`` columns are the usual inputs; missing values
    (``None``, NaN read as ``float``, blank) are skipped. Returns ``""`` when both are empty.
    """
    parts = []
    for title, text in (("Findings", findings), ("Impression", impressions)):
        if isinstance(text, str) and text.strip():
            parts.append(f"{title}: {' '.join(text.split())}")
    return " ".join(parts)


@lru_cache(maxsize=1)
def _segmenter() -> pysbd.Segmenter:
    return pysbd.Segmenter(language="en", clean=False)


def split_sentences(text: str) -> list[str]:
    """Sentences of a report, stripped, empty ones dropped.

    Uses pysbd's rule-based sentence boundary detection (Sadvilkar and Neumann, 2020,
    arXiv:2010.09657), which keeps abbreviations ("R.L.L.", "vs.") and decimals ("3.2 cm") inside
    their sentence.
    """
    return [s.strip() for s in _segmenter().segment(text) if s.strip()]
