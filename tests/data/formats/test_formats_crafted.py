"""Parsers on crafted, valid files: DFEW five-fold handling in its three forms, the CA-MER
manifest round trip, JSON-per-subset conversion and the skip report."""

import csv
import json
from pathlib import Path

import pytest

from src.core.label_space import DFEW, MER2023
from src.core.records import SampleRecord
from src.data.camer import manifest as camer
from src.data.components.skip_report import SkipReport
from src.data.formats import dfew


def make_dfew_folds(root: Path) -> dict[int, tuple[dict[str, int], dict[str, int]]]:
    """Write 5 folds in the three forms; returns {fold: (train, test)} of name -> label 1-7."""
    clips = list(range(1, 31))
    folds = {}
    for k in range(1, 6):
        test_ids = [c for c in clips if (c - 1) % 5 == k - 1]
        train_ids = [c for c in clips if c not in test_ids]
        label = {c: (c * 3 + k) % 7 + 1 for c in clips}
        parts = {}
        for part, ids in (("train", train_ids), ("test", test_ids)):
            official = root / "official" / "EmoLabel_DataSplit" / f"{part}(single-labeled)"
            official.mkdir(parents=True, exist_ok=True)
            rows = "".join(f"{c},{label[c]}\n" for c in ids)
            (official / f"set_{k}.csv").write_text("video_name,label\n" + rows)
            (root / "dfer-clip").mkdir(exist_ok=True)
            lines = "".join(f"/d/DFEW_Frame_Face/{c:05d} {10 + c} {label[c] - 1}\n" for c in ids)
            (root / "dfer-clip" / f"DFEW_set_{k}_{part}.txt").write_text(lines)
            mae = root / "mae-dfer" / f"split0{k}"
            mae.mkdir(parents=True, exist_ok=True)
            # MAE-DFER wrote val.csv instead of test.csv for some folds.
            name = "val.csv" if part == "test" and k in (2, 3) else f"{part}.csv"
            lines = "".join(f"/m/jpg_256/{c:05d} {label[c] - 1}\n" for c in ids)
            (mae / name).write_text(lines)
            parts[part] = {f"{c:05d}": label[c] for c in ids}
        folds[k] = (parts["train"], parts["test"])
    return folds


@pytest.mark.parametrize("protocol", dfew.PROTOCOLS)
def test_dfew_five_folds_in_each_form(tmp_path, protocol):
    truth = make_dfew_folds(tmp_path)
    files = dfew.fold_files(tmp_path / protocol, protocol)
    assert [f.fold for f in files] == [1, 2, 3, 4, 5]
    all_test: set[str] = set()
    for k in dfew.FOLDS:
        train, test = dfew.read_fold(tmp_path / protocol, k, protocol=protocol)
        want_train, want_test = truth[k]
        assert {r.name: r.label for r in train} == {
            n: DFEW.labels[y - 1] for n, y in want_train.items()
        }
        assert {r.name: r.label for r in test} == {
            n: DFEW.labels[y - 1] for n, y in want_test.items()
        }
        assert {r.split for r in train} == {"train"} and {r.split for r in test} == {"test"}
        all_test |= {r.name for r in test}
    assert len(all_test) == 30  # the five test folds partition the clips


def test_dfew_official_root_may_be_the_split_folder_and_labels_map(tmp_path):
    make_dfew_folds(tmp_path)
    inner = tmp_path / "official" / "EmoLabel_DataSplit"
    assert dfew.fold_files(inner)[0].train == dfew.fold_files(tmp_path / "official")[0].train
    path = inner / "test(single-labeled)" / "set_1.csv"
    path.write_text("video_name,label\n" + "".join(f"{i},{i}\n" for i in range(1, 8)))
    records = dfew.read_split(path)
    assert [r.label for r in records] == list(DFEW.labels)  # 1 happy ... 7 fear
    assert records[0].name == "00001"


def test_manifest_round_trip_with_and_without_reason(tmp_path):
    records = [
        SampleRecord("a", "test", "happy", subset="consistent", video_label="happy",
                     audio_label="happy", reason='He smiles, "glad".'),
        SampleRecord("b", "test", "sad", subset="video_aligned", video_label="sad",
                     audio_label="angry"),
        SampleRecord("c", "train", "angry", subset=None),
        SampleRecord("d", "val", "worried", subset="audio_aligned", audio_label="worried"),
    ]  # fmt: skip
    path = camer.write_manifest(tmp_path / "m.csv", records)
    header = next(csv.reader(path.open()))
    assert header == [*camer.MANIFEST_COLUMNS, "reason"]
    assert camer.read_manifest(path, MER2023) == records
    plain = [r for r in records if r.reason is None]
    camer.write_manifest(tmp_path / "p.csv", plain)
    assert next(csv.reader((tmp_path / "p.csv").open())) == list(camer.MANIFEST_COLUMNS)
    assert camer.read_manifest(tmp_path / "p.csv", MER2023) == plain


def test_manifest_reader_normalises_label_words(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(
        "name,split,subset,label,video_label,audio_label\n"
        "a,test,video_aligned,Happiness,joy,Anger\n"
    )
    (record,) = camer.read_manifest(path, MER2023)
    assert (record.label, record.video_label, record.audio_label) == ("happy", "happy", "angry")


def test_subset_jsons_convert_with_implied_modality_labels(tmp_path):
    (tmp_path / "video_aligned.json").write_text(
        json.dumps([{"video_name": "v1", "emotion": "Happy", "reasoning": "face smiles"}])
    )
    (tmp_path / "audio_aligned.json").write_text(
        json.dumps({"a1": {"label": "sad", "video_label": "happy", "split": "val"}})
    )
    (tmp_path / "consistent.json").write_text(json.dumps({"c1": "angry"}))
    records = camer.read_subset_jsons(tmp_path, MER2023)
    by_name = {r.name: r for r in records}
    v1, a1, c1 = by_name["v1"], by_name["a1"], by_name["c1"]
    assert (v1.subset, v1.label, v1.video_label, v1.audio_label) == (
        "video_aligned", "happy", "happy", None
    )  # fmt: skip
    assert v1.reason == "face smiles" and v1.split == "test"
    assert (a1.subset, a1.video_label, a1.audio_label, a1.split) == (
        "audio_aligned", "happy", "sad", "val"
    )  # fmt: skip
    assert (c1.video_label, c1.audio_label) == ("angry", "angry")
    out = camer.write_manifest(tmp_path / "manifest.csv", records)
    assert camer.read_manifest(out, MER2023) == records


@pytest.mark.parametrize(
    ("labels", "subset"),
    [
        (("happy", "happy", "happy"), "consistent"),
        (("happy", "happy", "sad"), "video_aligned"),
        (("happy", "sad", "happy"), "audio_aligned"),
        (("happy", "sad", "angry"), None),
        (("happy", "sad", "sad"), None),
    ],
)
def test_classify_conflict_rule(labels, subset):
    got, why = camer.classify_conflict(*labels)
    assert got == subset and why
    if subset is not None:
        assert camer.subset_conflict(subset, *labels) is None
        for other in {"consistent", "video_aligned", "audio_aligned"} - {subset}:
            assert camer.subset_conflict(other, *labels) is not None


def test_skip_report_csv_is_complete_and_atomic(tmp_path):
    report = SkipReport()
    report.add("a.csv", "label", "bad, with comma", "s1", line=3)
    report.add("clip.mp4", "audio", "no audio stream")
    path = report.write_csv(tmp_path / "sub" / "skipped.csv")
    rows = list(csv.DictReader(path.open()))
    assert rows == [
        {"file": "a.csv", "line": "3", "name": "s1", "field": "label", "reason": "bad, with comma"},
        {"file": "clip.mp4", "line": "", "name": "", "field": "audio", "reason": "no audio stream"},
    ]
    assert len(report) == 2 and report.names() == {"s1"}
    assert [p.name for p in path.parent.iterdir()] == ["skipped.csv"]  # no temp file left
