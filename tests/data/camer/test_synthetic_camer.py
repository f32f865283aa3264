"""The synthetic CA-MER generator: determinism, subsets as the manifest says, layout, refusals."""

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from src.core.label_space import MER2023
from src.core.streams import StreamSpec
from src.data.camer.manifest import read_manifest
from src.data.camer.synthetic import (
    SyntheticCAMERConfig,
    ensure_synthetic_camer,
    generate_synthetic_camer,
)

STREAMS = [
    StreamSpec("face", "mae_340_UTT", "visual", 12, 2),
    StreamSpec("video", "maeV_399_UTT", "visual", 12, 2),
    StreamSpec("audio", "HL-UTT", "audio", 12, 1),
]
SMALL = SyntheticCAMERConfig(n_train=30, n_val=10, n_test=30)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = tree_digest(generate_synthetic_camer(tmp_path / "a", STREAMS, SMALL))
    b = tree_digest(generate_synthetic_camer(tmp_path / "b", STREAMS, SMALL))
    c = tree_digest(generate_synthetic_camer(tmp_path / "c", STREAMS, replace(SMALL, seed=1)))
    assert a == b
    assert a["manifest.csv"] != c["manifest.csv"]
    assert a["HL-UTT/camer_000000.npy"] != c["HL-UTT/camer_000000.npy"]
    assert sum(k.endswith(".npy") for k in a) == 3 * 70  # 3 streams x 70 samples
    assert {"manifest.csv", "label.csv", "transcription.csv", "tokenizer/tokenizer.json"} <= set(a)


def test_layout_is_what_the_real_loaders_read(tmp_path):
    root = generate_synthetic_camer(tmp_path, STREAMS, SMALL)
    assert (root / "label.csv").read_text().splitlines()[0] == "name,discrete,valence"
    assert (root / "transcription.csv").read_text().splitlines()[0] == "name,english"
    records = read_manifest(root / "manifest.csv", MER2023)
    assert len(records) == 70
    for r in records[:5]:
        for s in STREAMS:
            assert np.load(root / s.feature_dir / f"{r.name}.npy").shape == (s.dim,)


def test_subsets_are_what_the_manifest_says(tmp_path):
    """Without noise, each stream's latent vector shows exactly the manifest's modality label,
    at full strength when it carries the truth and at conflict strength when it contradicts it."""
    clean = replace(
        SMALL, audio_noise=0.0, visual_noise=0.0, ambient_noise=0.0, conflict_strength=0.5
    )
    root = generate_synthetic_camer(tmp_path, STREAMS, clean)
    records = read_manifest(root / "manifest.csv", MER2023)
    labels = list(MER2023.labels)
    seen = set()
    for r in records:
        seen.add(r.subset)
        if r.subset == "consistent":
            assert r.label == r.video_label == r.audio_label
        elif r.subset == "video_aligned":
            assert r.label == r.video_label != r.audio_label
        else:
            assert r.label == r.audio_label != r.video_label
        for s in STREAMS:
            x = np.load(root / s.feature_dir / f"{r.name}.npy")
            shown = r.audio_label if s.modality == "audio" else r.video_label
            # The embedding has orthonormal columns: the latent is recovered from its projection.
            norm = float(np.linalg.norm(x))
            assert norm == pytest.approx(1.0 if shown == r.label else 0.5, abs=1e-5)
            assert shown in labels
    assert seen == {"consistent", "video_aligned", "audio_aligned"}


def test_conflict_ratios_per_split(tmp_path):
    cfg = replace(
        SMALL, n_train=100, n_test=90, train_conflict_ratio=0.1, test_conflict_ratio=2 / 3
    )
    records = read_manifest(
        generate_synthetic_camer(tmp_path, STREAMS, cfg) / "manifest.csv", MER2023
    )
    test = [r.subset for r in records if r.split == "test"]
    train = [r.subset for r in records if r.split == "train"]
    assert test.count("video_aligned") == test.count("audio_aligned") == 30
    assert train.count("consistent") == 90


def test_existing_root_is_reused_and_other_settings_refused(tmp_path):
    root = ensure_synthetic_camer(tmp_path, STREAMS, SMALL)
    before = tree_digest(root)
    ensure_synthetic_camer(tmp_path, STREAMS, SMALL)
    assert tree_digest(root) == before
    with pytest.raises(FileExistsError, match="other settings"):
        ensure_synthetic_camer(tmp_path, STREAMS, replace(SMALL, seed=3))


def test_bad_knobs_are_refused():
    with pytest.raises(ValueError, match="conflict_strength"):
        SyntheticCAMERConfig(conflict_strength=1.5)


def write_real_data_set(root: Path) -> dict[str, tuple[bytes, int]]:
    """A small data set in the real layout (not made by the generator); returns a snapshot."""
    names = ["sample_00000669", "sample_00000671", "sample_00000710"]
    (root / "HL-UTT").mkdir(parents=True)
    (root / "manifest.csv").write_text(
        "name,split,subset,label,video_label,audio_label\n"
        + "".join(f"{n},test,consistent,happy,happy,happy\n" for n in names)
    )
    (root / "label.csv").write_text(
        "name,discrete,valence\n" + "".join(f"{n},happy,2\n" for n in names)
    )
    (root / "transcription.csv").write_text("name,english\n" + "".join(f"{n},hi\n" for n in names))
    for n in names:
        np.save(root / "HL-UTT" / f"{n}.npy", np.ones(12, np.float32))
    return snapshot(root)


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_generator_never_writes_into_a_folder_of_files_it_did_not_write(tmp_path, capsys):
    from src.cli import main
    from src.data.camer.datamodule import SyntheticCAMERDataModule
    from src.data.camer.synthetic import OWNER_MARKER, ForeignDataError

    real = tmp_path / "CA-MER"
    before = write_real_data_set(real)
    for generate in (ensure_synthetic_camer, generate_synthetic_camer):
        with pytest.raises(ForeignDataError) as info:
            generate(real, STREAMS, SMALL)
        message = str(info.value)
        assert str(real) in message and "manifest.csv" in message and "label.csv" in message
    with pytest.raises(ForeignDataError):
        SyntheticCAMERDataModule(str(real), streams=STREAMS, synthetic=SMALL)
    assert main(["generate-camer", "--root", str(real), "--synthetic.n_train", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate-camer: error: ") and str(real) in err and "\n" not in err
    # Not one byte changed, nothing added (not even a lock file or the ownership marker).
    assert snapshot(real) == before and sorted(p.name for p in real.iterdir()) == [
        "HL-UTT",
        "label.csv",
        "manifest.csv",
        "transcription.csv",
    ]
    # An empty folder becomes the generator's; its own folder is reused as before.
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_synthetic_camer(empty, STREAMS, SMALL)
    assert (empty / OWNER_MARKER).is_file() and (empty / "manifest.csv").is_file()
    ensure_synthetic_camer(empty, STREAMS, SMALL)


def test_a_real_data_config_composed_over_the_demo_inherits_no_generator_settings(workdir, capsys):
    """The way experiments/paper_tables.py composes: the demo config, then `--data` with the
    real CA-MER config. The data block must lose the demo's `synthetic:` settings."""
    import yaml

    from src.cli import main
    from tests.conftest import REPO

    real = workdir / "CA-MER"
    before = write_real_data_set(real)
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "conf/default.yaml"),
                "--data",
                str(REPO / "conf/data/camer_real.yaml"),
                "--data.init_args.root",
                str(real),
                "--print_config",
            ]
        )
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    assert data["class_path"] == "src.data.camer.datamodule.CAMERDataModule"
    assert "synthetic" not in data["init_args"] and data["init_args"]["root"] == str(real)
    assert snapshot(real) == before
