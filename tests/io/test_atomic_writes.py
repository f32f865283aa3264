"""Files we write (features, manifests, skip reports, checkpoints, the synthetic data set) are
replaced atomically: a crash, even SIGKILL, leaves either the old file or the new one."""

import csv
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from src.core.records import SampleRecord
from src.core.streams import StreamSpec
from src.data.camer import synthetic as synthetic_camer
from src.data.camer.manifest import write_manifest
from src.data.components.skip_report import SkipReport
from src.evaluation.prediction_writer import merge_part_files
from src.io.atomic import atomic_open, atomic_write_text
from src.io.checkpoint_io import SafeCheckpointIO, load_checkpoint_safely
from tests.conftest import REPO


class Exploding:
    """A value whose text form raises: the writer dies in the middle of the file."""

    def __str__(self) -> str:
        raise RuntimeError("crash in the middle of the write")


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_open_keeps_the_old_file_when_the_writer_raises(tmp_path):
    text, binary = tmp_path / "a.txt", tmp_path / "b.npy"
    atomic_write_text(text, "old\n")
    np.save(binary, np.zeros(3))
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(text) as handle:
            handle.write("new " * 10_000)
            handle.write(str(Exploding()))
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_open(binary, "wb") as handle:
            np.save(handle, np.ones(1000))
            raise RuntimeError("crash after the array")
    assert text.read_text() == "old\n" and np.load(binary).tolist() == [0.0, 0.0, 0.0]
    assert leftovers(tmp_path) == []
    with atomic_open(binary, "wb") as handle:
        np.save(handle, np.ones(2))
    assert np.load(binary).tolist() == [1.0, 1.0]


WRITER = """
import sys, time
from src.io.atomic import atomic_open
with atomic_open(sys.argv[1]) as handle:
    for i in range(10_000):
        handle.write("new line %d\\n" % i)
        handle.flush()
        if i == 100:
            open(sys.argv[2], "w").close()  # tell the parent: half written
            time.sleep(60)
"""


def test_atomic_open_survives_sigkill_mid_write(tmp_path):
    target, halfway = tmp_path / "report.csv", tmp_path / "halfway"
    target.write_text("old complete file\n")
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(halfway)], cwd=REPO)
    deadline = time.monotonic() + 120
    while not halfway.exists():
        assert writer.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    assert target.read_text() == "old complete file\n"
    # The killed writer's partial temporary file is beside it, never in its place.
    (partial,) = leftovers(tmp_path)
    assert partial.startswith(".report.csv.") and "new line 100" in (tmp_path / partial).read_text()


def test_skip_report_and_manifest_keep_the_old_file_on_a_crash(tmp_path):
    report_path = SkipReport().write_csv(tmp_path / "skipped.csv")
    before = report_path.read_text()
    report = SkipReport()
    for i in range(200):
        report.add("a.csv", "label", "bad", f"s{i}", line=i)
    report.add("a.csv", "label", Exploding())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="crash"):
        report.write_csv(report_path)
    assert report_path.read_text() == before

    manifest = tmp_path / "manifest.csv"
    good = [SampleRecord(f"s{i}", "train", "happy") for i in range(100)]
    write_manifest(manifest, good)
    before = manifest.read_text()
    bad = [*good, SampleRecord("x", "train", "happy", reason=Exploding())]  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="crash"):
        write_manifest(manifest, bad)
    assert manifest.read_text() == before and len(list(csv.reader(before.splitlines()))) == 101
    assert leftovers(tmp_path) == []


def test_checkpoint_save_keeps_the_previous_checkpoint_on_a_crash(tmp_path):
    io, path = SafeCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(4)}, "global_step": 3}, path)
    broken = {"state_dict": {"w": torch.ones(100_000)}, "global_step": 6, "bad": lambda: 0}
    with pytest.raises(Exception, match="lambda|pickle"):
        io.save_checkpoint(broken, path)
    assert load_checkpoint_safely(path)["global_step"] == 3
    assert leftovers(tmp_path) == []


def test_synthetic_generator_crash_leaves_no_half_data_set(tmp_path, monkeypatch):
    streams = [StreamSpec(name="audio", feature_dir="HL-UTT", modality="audio", dim=8, tokens=1)]
    config = synthetic_camer.SyntheticCAMERConfig(seed=1, n_train=6, n_val=3, n_test=6)

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing the tokenizer")

    root = tmp_path / "crashed"
    monkeypatch.setattr(synthetic_camer, "build_word_tokenizer", crash)
    with pytest.raises(RuntimeError, match="tokenizer"):
        synthetic_camer.ensure_synthetic_camer(root, streams, config)
    monkeypatch.undo()
    # No completion marker: the next run regenerates; every file written before is whole.
    assert not (root / synthetic_camer.DONE_MARKER).exists()
    assert all(np.load(p).shape == (8,) for p in (root / "HL-UTT").glob("*.npy"))
    synthetic_camer.ensure_synthetic_camer(root, streams, config)
    clean = synthetic_camer.generate_synthetic_camer(tmp_path / "clean", streams, config)
    for path in sorted(clean.rglob("*")):
        if path.is_file():
            assert (root / path.relative_to(clean)).read_bytes() == path.read_bytes(), path
    assert leftovers(root) == [] and leftovers(root / "HL-UTT") == []


def file_modes(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")  # filelock's own lock files
    }


@pytest.mark.parametrize("umask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_written_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    streams = [StreamSpec(name="audio", feature_dir="HL-UTT", modality="audio", dim=8, tokens=1)]
    config = synthetic_camer.SyntheticCAMERConfig(seed=1, n_train=6, n_val=3, n_test=6)
    previous = os.umask(umask)
    try:
        # A data set (manifest, labels, subtitles, feature files, tokenizer), a checkpoint, a
        # skip report, a predictions file: everything a group sharing a folder has to read.
        synthetic_camer.generate_synthetic_camer(tmp_path / "data", streams, config)
        SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "ckpt" / "last.ckpt")
        SkipReport().write_csv(tmp_path / "skipped.csv")
        merge_part_files([], tmp_path / "predictions.csv", ["name"])
        atomic_write_text(tmp_path / "shared.txt", "old\n")
        os.chmod(tmp_path / "shared.txt", 0o640)
        atomic_write_text(tmp_path / "shared.txt", "new\n")  # replaced: keeps the owner's 0640
    finally:
        os.umask(previous)
    modes = file_modes(tmp_path)
    assert modes.pop("shared.txt") == oct(0o640)
    assert len(modes) > 20 and set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_many_small_files_skip_their_own_fsync_and_sync_once(tmp_path, monkeypatch):
    """The synthetic generator writes thousands of feature files with ``fsync=False`` and syncs
    once before its completion marker: each file still appears whole, in one rename."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    with atomic_open(tmp_path / "a.npy", "wb", fsync=False) as handle:
        np.save(handle, np.arange(3, dtype=np.float32))
    assert synced == []
    assert np.load(tmp_path / "a.npy").tolist() == [0.0, 1.0, 2.0]
    assert [p.name for p in tmp_path.iterdir()] == ["a.npy"]  # no temporary left
    atomic_write_text(tmp_path / "done.json", "{}")
    assert len(synced) == 1  # the default still syncs every file
    calls: list[str] = []
    monkeypatch.setattr(synthetic_camer, "sync_all", lambda: calls.append("sync"))
    streams = [StreamSpec("audio", "HL-UTT", "audio", 8, 1)]
    config = synthetic_camer.SyntheticCAMERConfig(n_train=4, n_val=2, n_test=2)
    synthetic_camer.generate_synthetic_camer(tmp_path / "set", streams, config)
    assert calls == ["sync"]
