"""A file from someone else never runs code: crafted pickles in checkpoints and backbone weights
are refused, YAML is loaded safely, and names in annotation files cannot leave the data root."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from src.cli import main
from src.core.label_space import MER2023
from src.core.records import SampleRecord
from src.core.streams import StreamSpec
from src.data.camer import manifest as camer
from src.data.camer.datamodule import CAMERDataModule
from src.data.camer.synthetic import SyntheticCAMERConfig
from src.data.components.feature_store import FeatureFileError, FeatureStore
from src.data.components.media import MediaDecodeError, find_clip
from src.data.components.skip_report import SkipReport
from src.data.formats.rows import FormatError
from src.io.checkpoint_io import SafeCheckpointIO, UnsafeCheckpointError
from src.io.safe_paths import unsafe_name_reason
from tests.conftest import TINY_CONFIG


class Payload:
    """Unpickling this runs ``touch <marker>``: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 0, "evil": Payload(marker)}, path)
    return path


# ------------------------------------------------------------------------------- checkpoints


def test_crafted_checkpoint_is_refused_by_the_cli_before_anything_runs(workdir, capsys):
    marker = workdir / "pwned"
    evil = crafted_checkpoint(workdir / "model.ckpt", marker)
    for command in ("test", "fit"):
        with pytest.raises(UnsafeCheckpointError) as info:
            main([command, "--config", str(TINY_CONFIG), "--ckpt_path", str(evil)])
        message = str(info.value)
        assert str(evil) in message
        assert "refused to load" in message and "arbitrary code" in message
        assert "posix.system" in message  # what it tried to construct
    assert not marker.exists()
    assert "Restoring states" not in capsys.readouterr().out


def test_checkpoint_io_loads_weights_only_whatever_the_caller_asks(tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "x.ckpt", marker)
    io = SafeCheckpointIO()
    for weights_only in (None, False, True):
        with pytest.raises(UnsafeCheckpointError, match="refused to load"):
            io.load_checkpoint(evil, weights_only=weights_only)
    assert not marker.exists()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 2}, good)
    assert io.load_checkpoint(good)["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_pickled_backbone_weights_are_refused(tmp_path):
    from transformers import LlamaConfig

    from src.models.backbone import build_backbone

    folder = tmp_path / "backbone"
    LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    ).save_pretrained(folder)
    marker = tmp_path / "pwned"
    weights = {"model.embed_tokens.weight": torch.zeros(64, 32), "evil": Payload(marker)}
    torch.save(weights, folder / "pytorch_model.bin")
    with pytest.raises(Exception, match="GLOBAL posix.system") as info:
        build_backbone(str(folder), None, 64, "float32", "sdpa", 0)
    assert "weights_only" in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ YAML


@pytest.mark.parametrize("tag", ["python/object/apply:os.system", "python/object/new:os.system"])
def test_yaml_with_python_tags_is_refused(workdir, capsys, tag):
    marker = workdir / "pwned"
    evil = workdir / "evil.yaml"
    evil.write_text(f'trainer:\n  max_epochs: !!{tag} ["touch {marker}"]\n')
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(TINY_CONFIG), "--config", str(evil), "--print_config"])
    assert info.value.code == 2
    assert f"could not determine a constructor for the tag 'tag:yaml.org,2002:{tag}'" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(TINY_CONFIG), "--trainer.max_epochs", f'!!{tag} ["x"]'])
    assert not marker.exists()


# ----------------------------------------------------------------------- names in manifests

ESCAPES = ["../outside", "../../etc/passwd", "/etc/passwd", "sub/dir", "..", "a\\..\\b", "C:x"]
HEADER = "name,split,subset,label,video_label,audio_label\n"


@pytest.mark.parametrize("name", ESCAPES)
def test_manifest_names_that_leave_the_root_are_rejected(tmp_path, name):
    assert unsafe_name_reason(name) is not None
    path = tmp_path / "manifest.csv"
    path.write_text(HEADER + f'"{name}",train,consistent,happy,happy,happy\nok,train,,sad,,\n')
    with pytest.raises(FormatError) as info:
        camer.read_manifest(path, MER2023)
    assert (info.value.field, info.value.line) == ("name", 2)
    report = SkipReport()
    assert [r.name for r in camer.read_manifest(path, MER2023, on_error="skip", report=report)] == [
        "ok"
    ]
    assert report.rows[0].field == "name" and repr(name) in report.rows[0].reason
    subset_dir = tmp_path / "json"
    subset_dir.mkdir()
    (subset_dir / "consistent.json").write_text(json.dumps([{"name": name, "label": "happy"}]))
    with pytest.raises(FormatError, match="entry 1"):
        camer.read_subset_jsons(subset_dir, MER2023)
    with pytest.raises(ValueError, match="field 'name'"):
        camer.write_manifest(
            tmp_path / "out.csv", [SampleRecord(name, "test", "happy", "consistent")]
        )


def test_ordinary_names_pass():
    for name in ["sample_00001", "A-1.b", "日本語", "name with spaces", "x.y.z", "..hidden"]:
        assert unsafe_name_reason(name) is None, name


STREAM = StreamSpec(name="audio", feature_dir="HL-UTT", modality="audio", dim=4, tokens=1)


def test_feature_store_keeps_names_and_symlinks_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "HL-UTT").mkdir(parents=True)
    secret = tmp_path / "secret.npy"
    np.save(secret, np.arange(4, dtype=np.float32))
    store = FeatureStore(root, [STREAM])
    for name in ["../../secret", "/tmp/x", ".."]:
        with pytest.raises(FeatureFileError) as info:
            store.load(name)
        assert info.value.field == "name"
    # A file that is a symlink out of its folder is refused; the target is never read.
    (root / "HL-UTT" / "link.npy").symlink_to(secret)
    with pytest.raises(FeatureFileError, match="outside") as info:
        store.load("link")
    assert info.value.field == "name" and info.value.path == root / "HL-UTT" / "link.npy"
    # A symlinked folder (features on shared storage) is followed as usual.
    shared = tmp_path / "shared"
    shared.mkdir()
    np.save(shared / "s1.npy", np.ones(4, dtype=np.float32))
    (root / "linked").symlink_to(shared, target_is_directory=True)
    linked = StreamSpec(name="audio", feature_dir="linked", modality="audio", dim=4, tokens=1)
    assert FeatureStore(root, [linked]).load("s1")["audio"].tolist() == [1.0] * 4


def test_media_lookup_refuses_escaping_names(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "outside.mp4").write_bytes(b"x")
    with pytest.raises(MediaDecodeError) as info:
        find_clip(tmp_path / "clips", "../outside")
    assert info.value.field == "name"
    (tmp_path / "clips" / "linked.mp4").symlink_to(tmp_path / "outside.mp4")
    with pytest.raises(MediaDecodeError, match="outside"):
        find_clip(tmp_path / "clips", "linked")


def test_data_module_skips_and_reports_a_feature_symlinked_out_of_the_root(tmp_path):
    streams = [StreamSpec(name="audio", feature_dir="HL-UTT", modality="audio", dim=8, tokens=1)]
    synthetic = SyntheticCAMERConfig(seed=0, n_train=8, n_val=4, n_test=6)
    root = tmp_path / "camer"
    module = CAMERDataModule(str(root), streams=streams, synthetic=synthetic, on_error="skip")
    victim = root / "HL-UTT" / "camer_000000.npy"
    outside = tmp_path / "outside.npy"
    victim.rename(outside)
    victim.symlink_to(outside)
    module.setup("fit")
    assert [row["name"] for row in module.skipped] == ["camer_000000"]
    assert "outside" in module.skipped[0]["reason"] and module.skipped[0]["field"] == "name"
    assert len(module.datasets["train"]) == 7
