"""Crafted bad annotation files: every error names the file, the line and the field; with
on_error="skip" the row is skipped and listed in the report, never dropped silently."""

import json
from pathlib import Path

import pytest

from src.core.label_space import MER2023
from src.core.records import SampleRecord
from src.data.camer import manifest as camer
from src.data.components.skip_report import SkipReport
from src.data.formats import dfew, emer, mer2023, subtitles
from src.data.formats.rows import FormatError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


LABELS = "name,discrete,valence\ns1,happy,1.0\n"


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ("s2,bored,0.5", "discrete", "'bored' is not in the mer2023 label space"),
        ("s2,,0.5", "discrete", "empty label"),
        ("s2,sad,very", "valence", "'very' is not a number"),
        ("s2,sad,nan", "valence", "not a finite number"),
        ("s2,sad,1,extra", "<row>", "expected 3 fields"),
        (",sad,1", "name", "empty name"),
    ],
)
def test_mer2023_bad_row_raises_naming_file_line_field(tmp_path, row, field, message):
    path = write(tmp_path / "train-label.csv", LABELS + row + "\n")
    with pytest.raises(FormatError) as info:
        mer2023.read_label_csv(path)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), 3, field)
    assert message in str(err) and str(path) in str(err) and "line 3" in str(err)


@pytest.mark.parametrize("row", ["s2,bored,0.5", "s2,sad,nan", "s2,sad,1,extra", "s1,sad,0"])
def test_mer2023_skip_mode_reports_the_row(tmp_path, row):
    path = write(tmp_path / "train-label.csv", LABELS + row + "\ns3,sad,-1\n")
    report = SkipReport()
    records = mer2023.read_label_csv(path, on_error="skip", report=report)
    assert [r.name for r in records] == ["s1", "s3"]
    assert len(report) == 1
    (skipped,) = report.to_rows()
    assert skipped["file"] == str(path) and skipped["line"] == 3 and skipped["reason"]


def test_duplicate_name_names_both_rows(tmp_path):
    path = write(tmp_path / "test1-label.csv", LABELS + "s2,sad,0\ns1,angry,-2\n")
    with pytest.raises(FormatError, match=r"duplicate name 's1': first at line 2, again at line 4"):
        mer2023.read_label_csv(path)


def test_skip_mode_without_a_report_is_refused(tmp_path):
    path = write(tmp_path / "train-label.csv", LABELS)
    with pytest.raises(ValueError, match="needs a SkipReport"):
        mer2023.read_label_csv(path, on_error="skip")
    with pytest.raises(ValueError, match="on_error must be one of"):
        mer2023.read_label_csv(path, on_error="ignore")


def test_missing_column_empty_file_and_missing_file(tmp_path):
    with pytest.raises(FormatError, match="missing column.*discrete") as info:
        mer2023.read_label_csv(write(tmp_path / "train-label.csv", "name,label\ns1,happy\n"))
    assert info.value.field == "discrete"
    with pytest.raises(FormatError, match="file is empty"):
        mer2023.read_label_csv(write(tmp_path / "test2-label.csv", ""))
    with pytest.raises(FileNotFoundError, match="nowhere-label.csv"):
        mer2023.read_label_csv(tmp_path / "nowhere-label.csv", split="test")


def test_case_and_synonyms_are_normalised_not_rejected(tmp_path):
    path = write(tmp_path / "train-label.csv", "name,discrete\na, HAPPY \nb,Anger\nc,worry\n")
    assert [r.label for r in mer2023.read_label_csv(path)] == ["happy", "angry", "worried"]
    assert all(r.valence is None for r in mer2023.read_label_csv(path))  # test3 has no valence


def test_emotion_llama_list_bad_lines(tmp_path):
    good = "s1 40 happy\ns2 12 Sadness -1.5\n"
    path = write(tmp_path / "list.txt", good + "s3 x happy\ns4 10\ns5 3 fear\n")
    report = SkipReport()
    records = mer2023.read_emotion_llama_list(path, on_error="skip", report=report)
    assert [(r.name, r.label, r.valence) for r in records] == [
        ("s1", "happy", None),
        ("s2", "sad", -1.5),
    ]
    assert [(row.line, row.field) for row in report.rows] == [
        (3, "n_frames"),
        (4, "<row>"),
        (5, "emotion"),  # fear is MERR, not MER2023
    ]


def test_missing_subtitle_is_an_error_or_a_reported_skip(tmp_path):
    subs = write(tmp_path / "transcription.csv", "name,sentence\ns1,hello there\n")
    texts = subtitles.read_subtitles(subs, column="chinese")  # name,sentence: one language
    assert texts == {"s1": "hello there"} == mer2023.read_transcription(subs)
    records = [SampleRecord("s1", label="happy"), SampleRecord("s2", label="sad")]
    with pytest.raises(FormatError, match="s2.*no subtitle") as info:
        mer2023.with_subtitles(records, texts, source=subs)
    assert info.value.file == str(subs)
    report = SkipReport()
    kept = mer2023.with_subtitles(records, texts, source=subs, on_error="skip", report=report)
    assert [r.subtitle for r in kept] == ["hello there"] and report.names() == {"s2"}
    optional = mer2023.with_subtitles(records, texts, source=subs, required=False)
    assert [r.subtitle for r in optional] == ["hello there", ""]


def test_subtitle_csv_without_the_language_column(tmp_path):
    subs = write(tmp_path / "t.csv", "name,chinese\ns1,你好\n")
    with pytest.raises(FormatError, match="missing column.*english"):
        subtitles.read_subtitles(subs)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("video_name,label\n1,0\n", "label"),  # official labels are 1..7
        ("video_name,label\n1,8\n", "label"),
        ("video_name,label\n1,happy\n", "label"),
        ("/x/00001 40 7\n", "label0"),  # label0 is 0..6
        ("/x/00001 forty 3\n", "n_frames"),
    ],
)
def test_dfew_labels_outside_the_range(tmp_path, text, field):
    path = write(tmp_path / "test" / "set_1.csv", text)
    with pytest.raises(FormatError) as info:
        dfew.read_split(path)
    assert info.value.field == field and info.value.line == (2 if "video_name" in text else 1)


def test_dfew_unrecognised_file_and_duplicates(tmp_path):
    with pytest.raises(FormatError, match="not a DFEW split"):
        dfew.read_split(write(tmp_path / "test.txt", "just one field per line\n".replace(" ", "")))
    dup = write(tmp_path / "split01" / "test.csv", "/a/00007 3\n/b/7 4\n")
    with pytest.raises(FormatError, match="duplicate name '00007'"):
        dfew.read_split(dup)


def test_dfew_fold_files_list_every_missing_file(tmp_path):
    write(tmp_path / "DFEW_set_1_train.txt", "/x/00001 10 0\n")
    with pytest.raises(FileNotFoundError) as info:
        dfew.fold_files(tmp_path, "dfer-clip")
    message = str(info.value)
    assert "DFEW_set_1_test.txt" in message and "DFEW_set_5_train.txt" in message
    assert "DFEW_set_1_train.txt" not in message
    with pytest.raises(ValueError, match="folds are"):
        dfew.fold_files(tmp_path, "dfer-clip", folds=(6,))
    with pytest.raises(ValueError, match="protocol"):
        dfew.fold_files(tmp_path, "dfer")


def test_dfew_fold_with_a_clip_in_train_and_test(tmp_path):
    write(tmp_path / "DFEW_set_2_train.txt", "/x/00001 10 0\n/x/00002 10 1\n")
    write(tmp_path / "DFEW_set_2_test.txt", "/x/00002 10 1\n")
    with pytest.raises(FormatError, match="00002.*disjoint") as info:
        dfew.read_fold(tmp_path, 2, protocol="dfer-clip")
    assert "DFEW_set_2_train.txt" in str(info.value)


def test_emer_bad_rows(tmp_path):
    v1 = write(
        tmp_path / "gt.csv",
        'names,emotions,subtitles,reasons\na,happy,hi,"He smiles."\nb,happy,hi,\nc,joy,x,"r"\n',
    )
    report = SkipReport()
    records = emer.read_emer_v1(v1, on_error="skip", report=report)
    assert [(r.name, r.label) for r in records] == [("a", "happy"), ("c", "happy")]
    assert [(row.name, row.field) for row in report.rows] == [("b", "reasons")]
    v2 = write(tmp_path / "v2.csv", "name,chinese,english\na,中文,\n")
    with pytest.raises(FormatError, match="'english'.*empty reasoning text"):
        emer.read_emer_v2(v2)
    assert emer.read_emer_v2(v2, language="chinese")[0].reason == "中文"
    with pytest.raises(ValueError, match="language"):
        emer.read_emer_v2(v2, language="french")


MANIFEST_HEADER = "name,split,subset,label,video_label,audio_label\n"


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ("x,test,,happy,happy,happy", "subset", "test samples need a subset"),
        ("x,dev,consistent,happy,happy,happy", "split", "'dev' is not one of"),
        ("x,test,mixed,happy,happy,happy", "subset", "'mixed' is not a subset"),
        ("x,test,consistent,happy,sad,happy", "subset", "needs video_label == label"),
        ("x,test,video_aligned,happy,happy,happy", "subset", "needs audio_label != label"),
        ("x,test,audio_aligned,sad,happy,happy", "subset", "needs audio_label == label"),
        ("x,test,consistent,bored,,", "label", "not in the mer2023 label space"),
        ("x,test,consistent,,,", "label", "empty label"),
    ],
)
def test_camer_manifest_bad_rows(tmp_path, row, field, message):
    path = write(tmp_path / "manifest.csv", MANIFEST_HEADER + row + "\n")
    with pytest.raises(FormatError) as info:
        camer.read_manifest(path, MER2023)
    assert (info.value.field, info.value.line) == (field, 2) and message in str(info.value)
    report = SkipReport()
    assert camer.read_manifest(path, MER2023, on_error="skip", report=report) == []
    assert len(report) == 1


def test_camer_writer_refuses_what_the_reader_would_reject(tmp_path):
    bad = [
        SampleRecord("a", split="test", label="happy"),  # no subset on a test row
        SampleRecord("a", split="dev", label="happy", subset="consistent"),
        SampleRecord("a", split="test", label="happy", subset="video_aligned", audio_label="happy"),
    ]
    for record in bad:
        with pytest.raises(ValueError, match="sample 'a'"):
            camer.write_manifest(tmp_path / "m.csv", [record])
    ok = SampleRecord("a", split="test", label="happy", subset="consistent")
    with pytest.raises(ValueError, match="duplicate"):
        camer.write_manifest(tmp_path / "m.csv", [ok, ok])
    assert not (tmp_path / "m.csv").exists()


def test_camer_subset_json_bad_entries(tmp_path):
    bad_json = write(tmp_path / "a" / "consistent.json", "[{'name': 1}]")
    with pytest.raises(FormatError, match="invalid JSON"):
        camer.read_subset_jsons(tmp_path / "a", MER2023)
    entries = [
        {"name": "v1", "label": "happy", "video_label": "happy", "audio_label": "sad"},
        {"name": "v2", "label": "happy", "video_label": "sad", "audio_label": "happy"},
        {"label": "sad"},
    ]
    write(tmp_path / "b" / "video_aligned.json", json.dumps(entries))
    write(tmp_path / "b" / "consistent.json", json.dumps({"v1": "happy"}))
    report = SkipReport()
    records = camer.read_subset_jsons(tmp_path / "b", MER2023, on_error="skip", report=report)
    assert [(r.name, r.subset) for r in records] == [("v1", "video_aligned")]
    reasons = {(row.field, row.name): row.reason for row in report.rows}
    assert "needs video_label == label" in reasons[("subset", "v2")]
    assert "has no name" in reasons[("name", None)]
    assert (
        "already in" in reasons[("name", "v1")] and "video_aligned.json" in reasons[("name", "v1")]
    )
    with pytest.raises(FormatError, match="not one of"):
        camer.read_subset_json(write(tmp_path / "mixed.json", "[]"), MER2023)
    assert bad_json.exists()
