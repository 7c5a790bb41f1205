"""Report sentences to anatomical regions, and chain-of-thought steps."""

from __future__ import annotations

import pytest
from scripts.data import ChainOfThoughtd, RegionLexicon, RegionSentencesd, split_cot_steps


@pytest.fixture(scope="module")
def lexicon(bundle_root, region_map):
    return RegionLexicon.from_file(bundle_root / "configs/region_lexicon.json", region_map)


def _names(lexicon, sentence):
    return [lexicon.region_names[r] for r in lexicon.regions_of(sentence)]


@pytest.mark.parametrize(
    "sentence, expected",
    [
        ("The right middle lobe shows a nodule.", ["lung_middle_lobe_right"]),
        ("RUL nodule, 4 mm.", ["lung_upper_lobe_right"]),
        ("Atelectasis in both lower lobes.", ["lung_lower_lobe_left", "lung_lower_lobe_right"]),
        ("Right upper lobe and left lower lobe nodules.", ["lung_lower_lobe_left", "lung_upper_lobe_right"]),
        ("Nodule in the lower lobe of the left lung.", ["lung_lower_lobe_left"]),
        ("Left pleural effusion.", ["lung_upper_lobe_left", "lung_lower_lobe_left"]),
        (
            "Bilateral pleural effusion.",
            [
                "lung_upper_lobe_left",
                "lung_lower_lobe_left",
                "lung_upper_lobe_right",
                "lung_middle_lobe_right",
                "lung_lower_lobe_right",
            ],
        ),
        ("Pulmonary veins are dilated.", ["pulmonary_vein"]),
        ("Calcified plaques in the aortic arch and coronary arteries.", ["heart", "aorta"]),
        ("Degenerative osteophytes in the thoracic vertebrae.", ["spine_cord"]),
        ("Mediastinal structures were evaluated as natural.", []),
    ],
)
def test_sentences_name_the_right_regions(lexicon, sentence, expected):
    assert _names(lexicon, sentence) == expected


def test_normal_sentences(lexicon):
    assert lexicon.is_normal("Heart size is normal.")
    assert lexicon.is_normal("No pleural effusion was detected.")
    assert lexicon.is_normal("Trachea and both main bronchi are patent.")
    assert not lexicon.is_normal("A 5 mm nodule in the right upper lobe.")


def test_lexicon_with_an_unknown_region_is_refused(region_map):
    spec = {"side_words": {}, "side_window": 3, "regions": {"appendix": {"side": None, "terms": ["appendix"]}}}
    with pytest.raises(ValueError, match="'appendix' is not in the region map"):
        RegionLexicon(spec, region_map, source="test.json")


def test_region_sentences_from_report_text(lexicon):
    out = RegionSentencesd(lexicon)(
        {"text": "Heart size is normal. A nodule in the right middle lobe. Liver unremarkable."}
    )
    filled = {lexicon.region_names[r]: t for r, t in enumerate(out["region_text"]) if t}
    assert filled == {
        "heart": "Heart size is normal.",
        "lung_middle_lobe_right": "A nodule in the right middle lobe.",
        "liver_gallbladder": "Liver unremarkable.",
    }
    normal = {lexicon.region_names[r] for r, n in enumerate(out["region_normal"].tolist()) if n}
    assert normal == {"heart", "liver_gallbladder"}


@pytest.mark.parametrize(
    "cot",
    [
        "Step 1: Inspect the lungs. Step 2: The right lower lobe shows consolidation. Step 3: Conclude pneumonia.",
        "1. Inspect the lungs.\n2. The right lower lobe shows consolidation.\n3) Conclude pneumonia.",
        '["Inspect the lungs.", "The right lower lobe shows consolidation.", "Conclude pneumonia."]',
        ["Inspect the lungs.", "The right lower lobe shows consolidation.", "Conclude pneumonia."],
    ],
)
def test_three_step_chain_of_thought_in_order(cot):
    assert split_cot_steps(cot) == [
        "Inspect the lungs.",
        "The right lower lobe shows consolidation.",
        "Conclude pneumonia.",
    ]


def test_chain_of_thought_steps_are_tagged(lexicon):
    out = ChainOfThoughtd(lexicon)(
        {"cot": "Step 1: Inspect the lungs. Step 2: The right lower lobe shows consolidation."}
    )
    assert [s["text"] for s in out["cot_steps"]] == ["Inspect the lungs.", "The right lower lobe shows consolidation."]
    assert len(out["cot_steps"][0]["regions"]) == 5
    assert [lexicon.region_names[r] for r in out["cot_steps"][1]["regions"]] == ["lung_lower_lobe_right"]
    assert ChainOfThoughtd(lexicon)({"text": "x"})["cot_steps"] == []
    with pytest.raises(ValueError, match="starts like a JSON list but is not one"):
        split_cot_steps("[not json")
