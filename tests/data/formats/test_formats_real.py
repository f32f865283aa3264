"""Parsers against the real files in $MOSEAR_REALDATA (the ``realdata`` fixture of conftest.py:
skipped when unset, failing when set but missing)."""

from collections import Counter

import pytest

from src.core.label_space import DFEW, MER2023, MERR
from src.data.formats import dfew, emer, mer2023, subtitles

CLIP_LABELS = {
    "sample_00000167": "neutral",
    "sample_00000338": "worried",
    "sample_00000669": "surprise",
    "sample_00000694": "angry",
    "sample_00000727": "sad",
    "sample_00001073": "happy",
}


def test_mer2023_label_csv_six_clips_one_per_class(realdata):
    records = mer2023.read_label_csv(realdata / "mer2023-mini/label.csv", split="train")
    assert {r.name: r.label for r in records} == CLIP_LABELS
    assert sorted(r.label for r in records) == sorted(MER2023.labels)
    by_name = {r.name: r for r in records}
    assert by_name["sample_00000727"].valence == pytest.approx(-4.75)
    assert by_name["sample_00001073"].valence == pytest.approx(1.5)
    assert {r.split for r in records} == {"train"}


def test_mer2023_label_csv_file_name_gives_no_split(realdata):
    # "label.csv" is not one of the official names: the split must be given.
    with pytest.raises(ValueError, match="split"):
        mer2023.read_label_csv(realdata / "mer2023-mini/label.csv")


def test_mer2023_subtitles_in_both_languages(realdata):
    path = realdata / "mer2023-mini/transcription.csv"
    english = subtitles.read_subtitles(path, column="english")
    chinese = subtitles.read_subtitles(path, column="chinese")
    assert set(english) == set(chinese) == set(CLIP_LABELS)
    assert english["sample_00000338"] == "Oh no, my phone and wallet are both in the bag."
    assert chinese["sample_00000338"] == "糟了，我手机、钱包都在包里呢。"
    records = mer2023.read_label_csv(realdata / "mer2023-mini/label.csv", split="train")
    with_text = mer2023.with_subtitles(records, english, source=path)
    assert all(r.subtitle == english[r.name] for r in with_text)


def test_emer_v1_hundred_rows_with_reasons(realdata):
    records = emer.read_emer_v1(realdata / "emer/gt-eng.csv")
    assert len(records) == 100
    assert len({r.name for r in records}) == 100
    assert set(r.label for r in records) <= set(MER2023.labels)
    counts = Counter(r.label for r in records)
    assert sum(counts.values()) == 100 and counts["angry"] > counts["surprise"] > 0
    first = records[0]
    assert first.name == "sample_00000648" and first.label == "angry"
    assert first.subtitle == "Don't talk to me about feelings anymore."
    assert first.reason.startswith("In the video, he roared")
    assert all(r.reason and r.split == "test" for r in records)


def test_emer_v1_through_the_merr_label_space(realdata):
    records = emer.read_emer_v1(realdata / "emer/gt-eng.csv", label_space=MERR)
    assert len(records) == 100 and {r.label for r in records} <= set(MERR.labels)


def test_dfew_fold1_test_dfer_clip_form(realdata):
    path = realdata / "dfew/DFEW_set_1_test.txt"
    assert dfew.detect_protocol(path) == "dfer-clip"
    records = dfew.read_split(path)
    assert len(records) == 2341
    assert {r.split for r in records} == {"test"}
    assert set(r.label for r in records) == set(DFEW.labels)  # all seven classes present
    assert (records[0].name, records[0].label) == ("00001", "sad")  # label0 1 -> sad
    assert (records[2].name, records[2].label) == ("00004", "sad")
    assert (records[3].name, records[3].label) == ("00006", "angry")  # label0 3 -> angry
    assert (records[-1].name, records[-1].label) == ("04342", "surprise")


def test_dfew_mae_dfer_form_matches_dfer_clip_form(realdata):
    path = realdata / "dfew/mae-dfer_split01_test.csv"
    assert dfew.detect_protocol(path) == "mae-dfer"
    mae = dfew.read_split(path)
    clip = dfew.read_split(realdata / "dfew/DFEW_set_1_test.txt")
    assert [(r.name, r.label) for r in mae] == [(r.name, r.label) for r in clip]
    # Class balance of fold 1's test split (disgust is the rare class).
    counts = Counter(r.label for r in mae)
    assert counts.most_common(1)[0][0] == "neutral" and min(counts, key=counts.get) == "disgust"
