"""``build-camer``: the CA-MER rules, rejections with reasons, invalid rows and the report."""

import csv
import json
from pathlib import Path

from src.core.label_space import MER2023, get_label_space
from src.data.camer.build_command import main
from src.data.camer.manifest import read_manifest

ANNOTATIONS = """name,video_label,audio_label,label,split,reason
c1,happy,happy,happy,test,"Smiles, laughs."
c2,Sad,sadness,sad,,
v1,angry,sad,angry,test,
v2,worried,neutral,Worry,train,
a1,happy,surprise,surprise,test,
a2,neutral,angry,angry,val,
r1,happy,sad,angry,test,
r2,sad,sad,happy,test,
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def run(tmp_path: Path, *extra: str, text: str = ANNOTATIONS) -> tuple[int, Path]:
    source = write(tmp_path / "annotations.csv", text)
    out = tmp_path / "out"
    return main(["--annotations", str(source), "--output", str(out), *extra]), out


def test_rules_sort_samples_into_subsets(tmp_path, capsys):
    code, out = run(tmp_path)
    assert code == 0
    records = {r.name: r for r in read_manifest(out / "manifest.csv", MER2023)}
    assert {n: r.subset for n, r in records.items()} == {
        "c1": "consistent",
        "c2": "consistent",
        "v1": "video_aligned",
        "v2": "video_aligned",
        "a1": "audio_aligned",
        "a2": "audio_aligned",
    }
    assert records["v2"].label == "worried" and records["c2"].video_label == "sad"
    assert records["c2"].split == "test"  # empty split -> the default
    assert (records["v2"].split, records["a2"].split) == ("train", "val")
    assert records["c1"].reason == "Smiles, laughs." and records["v1"].reason is None
    printed = capsys.readouterr().out
    assert "6 accepted, 2 rejected, 0 invalid" in printed and "r1" in printed


def test_rejected_rows_are_listed_with_their_reason(tmp_path):
    _, out = run(tmp_path)
    rows = list(csv.DictReader((out / "rejected.csv").open()))
    assert [(r["kind"], r["name"], r["line"], r["field"]) for r in rows] == [
        ("rejected", "r1", "8", "label"),
        ("rejected", "r2", "9", "label"),
    ]
    assert "matches neither video_label 'happy' nor audio_label 'sad'" in rows[0]["reason"]
    assert "agree on 'sad' but label is 'happy'" in rows[1]["reason"]


def test_report_counts(tmp_path):
    _, out = run(tmp_path)
    report = json.loads((out / "build_report.json").read_text())
    counts = report["counts"]
    assert (counts["total_rows"], counts["accepted"], counts["rejected"], counts["invalid"]) == (
        8,
        6,
        2,
        0,
    )
    assert counts["by_subset"] == {"video_aligned": 2, "audio_aligned": 2, "consistent": 2}
    assert counts["by_split"] == {"test": 4, "train": 1, "val": 1}
    assert counts["by_split_subset"]["test"] == {
        "video_aligned": 1,
        "audio_aligned": 1,
        "consistent": 2,
    }
    assert counts["by_label"] == {"angry": 2, "happy": 1, "sad": 1, "surprise": 1, "worried": 1}
    assert counts["by_subset_label"]["audio_aligned"] == {"angry": 1, "surprise": 1}
    assert [r["name"] for r in report["rejected"]] == ["r1", "r2"]
    table = list(csv.DictReader((out / "build_report.csv").open()))
    assert sum(int(r["count"]) for r in table) == 6
    assert {"split": "val", "subset": "audio_aligned", "label": "angry", "count": "1"} in table


def test_invalid_row_is_an_error_naming_file_line_field(tmp_path, capsys):
    text = ANNOTATIONS + "x1,happy,bored,happy,test,\n"
    code, out = run(tmp_path, text=text)
    assert code == 2 and not (out / "manifest.csv").exists()
    err = capsys.readouterr().err
    assert "annotations.csv, line 10" in err and "'audio_label'" in err and "'bored'" in err


def test_invalid_rows_skipped_and_listed(tmp_path):
    text = ANNOTATIONS + "x1,happy,bored,happy,test,\nc1,sad,sad,sad,test,\nx3,sad,sad,sad,dev,\n"
    code, out = run(tmp_path, "--on_error", "skip", text=text)
    assert code == 0
    rows = list(csv.DictReader((out / "rejected.csv").open()))
    invalid = [(r["name"], r["field"]) for r in rows if r["kind"] == "invalid"]
    assert invalid == [("x1", "audio_label"), ("c1", "name"), ("x3", "split")]
    dup = next(r for r in rows if r["name"] == "c1")
    assert "first at line 2, again at line 11" in dup["reason"]
    manifest = read_manifest(out / "manifest.csv", MER2023)
    assert len(manifest) == 6 and {r.name for r in manifest}.isdisjoint({"x1", "x3"})
    assert next(r for r in manifest if r.name == "c1").label == "happy"  # first row kept


def test_missing_column_and_missing_file(tmp_path, capsys):
    code, _ = run(tmp_path, text="name,video_label,label\na,happy,happy\n")
    assert code == 2 and "audio_label" in capsys.readouterr().err
    code = main(["--annotations", str(tmp_path / "none.csv"), "--output", str(tmp_path / "o")])
    assert code == 2 and "none.csv" in capsys.readouterr().err
    assert main(["--output", str(tmp_path / "o")]) == 2  # no input given


def test_nothing_accepted_writes_nothing(tmp_path):
    code, out = run(tmp_path, text="name,video_label,audio_label,label\nr,happy,sad,angry\n")
    assert code == 1 and not out.exists()


def test_custom_label_space(tmp_path):
    text = "name,video_label,audio_label,label\na,calm,tense,calm\nb,calm,calm,calm\n"
    code, out = run(tmp_path, "--label_space", "calm,tense", text=text)
    assert code == 0
    space = get_label_space(["calm", "tense"])
    subsets = {r.name: r.subset for r in read_manifest(out / "manifest.csv", space)}
    assert subsets == {"a": "video_aligned", "b": "consistent"}


def test_json_per_subset_release(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    write(release / "video_aligned.json", json.dumps([{"name": "v", "label": "sad"}]))
    write(release / "consistent.json", json.dumps({"c": {"emotion": "happy", "reason": "r"}}))
    out = tmp_path / "out"
    assert main(["--json_dir", str(release), "--output", str(out)]) == 0
    records = {r.name: r for r in read_manifest(out / "manifest.csv", MER2023)}
    assert (records["v"].subset, records["v"].video_label, records["v"].audio_label) == (
        "video_aligned",
        "sad",
        None,
    )
    assert records["c"].reason == "r" and records["c"].audio_label == "happy"


def test_registered_in_the_cli(tmp_path):
    from src.cli import main as cli_main

    source = write(tmp_path / "a.csv", ANNOTATIONS)
    assert cli_main(["build-camer", "--annotations", str(source), "--output", str(tmp_path)]) == 0
    assert (tmp_path / "manifest.csv").is_file()
