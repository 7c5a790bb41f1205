"""Radiology report text: assembling the training text and splitting it into sentences."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
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


_STEP_MARKER = re.compile(r"\bstep\s*\d+\s*[:.)-]\s*", re.IGNORECASE)
_NUMBERED_LINE = re.compile(r"^\s*\d+\s*[.)]\s+")


def split_cot_steps(cot: str | Sequence[str] | None) -> list[str]:
    """Ordered reasoning steps of a chain-of-thought text.

    Accepted forms, tried in this order: a list of strings (one step each); a JSON list in a string
    (``'["...", "..."]'``); ``"Step N:"`` markers (``Step 1: ... Step 2: ...``, on one line or many);
    numbered lines (``1. ...`` / ``2) ...``, continuation lines join the step above); otherwise one step
    per sentence (`split_sentences`). Empty steps are dropped; ``None`` or ``""`` gives ``[]``.

    Raises:
        ValueError: a string that starts with ``[`` but is not a JSON list of strings.
    """
    if cot is None:
        return []
    if not isinstance(cot, str):
        return [" ".join(str(s).split()) for s in cot if str(s).strip()]
    text = cot.strip()
    if text.startswith("["):
        try:
            steps = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"chain-of-thought text starts like a JSON list but is not one: {err}") from err
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise ValueError("a chain-of-thought JSON list must hold strings only")
        return split_cot_steps(steps)
    if _STEP_MARKER.search(text):
        return split_cot_steps(_STEP_MARKER.split(text))
    lines = [line for line in text.splitlines() if line.strip()]
    if any(_NUMBERED_LINE.match(line) for line in lines):
        steps: list[str] = []
        for line in lines:
            if _NUMBERED_LINE.match(line) or not steps:
                steps.append(_NUMBERED_LINE.sub("", line))
            else:
                steps[-1] += " " + line.strip()
        return split_cot_steps(steps)
    return split_sentences(text)


def fit_report(findings: str | None, impressions: str | None, tokenizer, max_length: int) -> tuple[str, bool]:
    """The training text of a report within ``max_length`` tokens, keeping the impressions whole.

    When ``"Findings: ... Impression: ..."`` (`assemble_report`) is longer than the text encoder's limit,
    trailing findings sentences are dropped until it fits, so the tokenizer never silently cuts the
    impression at the end. If the impression alone is too long it is kept and the encoder truncates it.

    Args:
        findings, impressions: report sections (``None``/NaN allowed).
        tokenizer: a Hugging Face tokenizer (counts include its special tokens).
        max_length: the encoder's token limit.

    Returns:
        ``(text, shortened)``: the text and whether anything was dropped or will be truncated.
    """

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True)["input_ids"])

    text = assemble_report(findings, impressions)
    if n_tokens(text) <= max_length:
        return text, False
    sentences = split_sentences(findings) if isinstance(findings, str) else []
    lo, hi = 0, len(sentences)  # largest number of leading findings sentences that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(assemble_report(" ".join(sentences[:mid]), impressions)) <= max_length:
            lo = mid
        else:
            hi = mid - 1
    return assemble_report(" ".join(sentences[:lo]), impressions), True
