"""A file from someone else never runs code: crafted pickles in checkpoints and backbone weights
are refused, YAML is loaded safely, and names in annotation files cannot leave the data root."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.cli import main
from src.core.label_space import MER2023
from src.core.records import SampleRecord
from src.core.streams import StreamSpec
from src.data.camer import manifest as camer
from src.data.camer.datamodule import SyntheticCAMERDataModule
from src.data.camer.synthetic import SyntheticCAMERConfig
from src.data.components.feature_store import FeatureFileError, FeatureStore
from src.data.components.media import MediaDecodeError, find_clip
from src.data.components.skip_report import SkipReport
from src.data.formats.rows import FormatError
from src.io.checkpoint_io import SafeCheckpointIO, UnsafeCheckpointError
from src.io.safe_paths import unsafe_name_reason
from tests.conftest import TINY_CONFIG
from tests.fault_injection import SMALL, expect_user_error, tiny_config


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
        message = expect_user_error(
            capsys, [command, "--config", str(TINY_CONFIG), "--ckpt_path", str(evil)]
        )
        assert str(evil) in message
        assert "refused to load" in message and "arbitrary code" in message
        assert "posix.system" in message  # what it tried to construct
    assert not marker.exists()
    assert "Restoring states" not in capsys.readouterr().out


def _importable_payload(folder: Path, marker: Path) -> str:
    """A module on ``sys.path`` whose import (or whose class's construction) writes ``marker``:
    proof that a name in a file was imported."""
    name = f"payload_{os.getpid()}"
    (folder / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "class Evil:\n    def __init__(self, x: int = 0):\n"
        f"        Path({str(marker)!r}).write_text('built')\n"
    )
    return name


#: What the tiny config's checkpoints hold as hyper_parameters (plain values).
TINY_HPARAMS = {
    "_class_path": "src.models.emotion_module.EmotionLLMModule",
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
    "backbone": {
        "class": "src.models.backbones.projected_causal_lm.ProjectedCausalLM",
        "settings": {
            "config": {
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 256,
            },
            "seed": 0,
        },
    },
    "lr": 0.005,
}
TINY_BACKBONE = TINY_HPARAMS["backbone"]


def test_checkpoint_hyper_parameters_naming_code_are_refused(workdir, capsys, monkeypatch):
    """A weights-only checkpoint whose hyper_parameters name classes or modules: refused under
    test, predict and fit --ckpt_path; nothing is imported or built."""
    config = str(tiny_config(workdir))
    monkeypatch.syspath_prepend(str(workdir))
    marker, victim = workdir / "pwned", workdir / "victim.txt"
    victim.write_text("precious\n")
    module = _importable_payload(workdir, marker)
    handler = {"class_path": "logging.FileHandler", "init_args": {"filename": str(victim)}}
    popen = {"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}"}}
    hostile = {
        # A class inside an Any-like value (the backbone's config kwargs).
        "handler": (
            {"backbone": {**TINY_BACKBONE, "settings": {"config": {"h": handler}}}},
            "backbone.settings.config.h.class_path",
        ),
        "popen": (
            {"backbone": {**TINY_BACKBONE, "settings": {"config": {"h": popen}}}},
            "backbone.settings.config.h.class_path",
        ),
        # The backbone class named by the file (compared as a string, never imported).
        "backbone": ({"backbone": {**TINY_BACKBONE, "class": f"{module}.Evil"}}, "backbone.class"),
        # The model class named by the file (a module to import).
        "class": ({"_class_path": f"{module}.Evil"}, "was written by"),
    }
    for name, (change, words) in hostile.items():
        path = workdir / f"{name}.ckpt"
        torch.save(
            {"state_dict": {}, "global_step": 3, "hyper_parameters": {**TINY_HPARAMS, **change}},
            path,
        )
        for command in ("test", "predict", "fit"):
            line = expect_user_error(
                capsys, [command, "--config", config, "--ckpt_path", str(path)]
            )
            assert str(path) in line and "hyper_parameters" in line and words in line, line
    assert not marker.exists() and module not in sys.modules
    assert victim.read_text() == "precious\n"
    assert not (workdir / "data").exists()  # refused before anything was built


@pytest.mark.slow
def test_checkpoint_plain_values_merge_and_class_arguments_are_left_out(workdir, monkeypatch):
    config = str(tiny_config(workdir, data={"synthetic": SMALL}))
    cli = main(["fit", "--config", config, "--test_after_fit", "false"])
    trained = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    monkeypatch.syspath_prepend(str(workdir))
    marker = workdir / "pwned"
    module = _importable_payload(workdir, marker)
    # A string where a class is expected (the adapter) is left out, not resolved; plain values
    # still come from the checkpoint (the frozen backbone's seed).
    path = workdir / "adapter.ckpt"
    backbone = trained["hyper_parameters"]["backbone"]
    backbone = {**backbone, "settings": {**backbone["settings"], "seed": 7}}
    hparams = {**trained["hyper_parameters"], "adapter": f"{module}.Evil", "backbone": backbone}
    torch.save({**trained, "hyper_parameters": hparams}, path)
    with pytest.warns(UserWarning, match=r"\['adapter'\] are not plain init arguments"):
        tested = main(["test", "--config", config, "--ckpt_path", str(path)])
    assert type(tested.model.adapter).__name__ == "LoRAAdapter"
    assert tested.model.model.backbone.seed == 7
    assert not marker.exists() and module not in sys.modules


def test_any_typed_config_values_are_never_built_or_imported(workdir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(workdir))
    marker = workdir / "pwned"
    module = _importable_payload(workdir, marker)
    value = f'{{h: {{class_path: {module}.Evil}}, s: "{{class_path: {module}.Evil}}"}}'
    main_args = [
        "fit", "--config", str(TINY_CONFIG), "--model.init_args.backbone.init_args.config", value
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        main([*main_args, "--print_config"])
    printed = capsys.readouterr().out
    assert f"class_path: {module}.Evil" in printed  # kept as plain data
    assert not marker.exists() and module not in sys.modules


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

    from src.models.backbones.causal_lm import load_causal_lm

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
        load_causal_lm(str(folder), None, 64, "float32", "sdpa", 0)
    assert "weights_only" in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ YAML


@pytest.mark.parametrize("tag", ["python/object/apply:os.system", "python/object/new:os.system"])
def test_yaml_with_python_tags_is_refused(workdir, capsys, tag):
    marker = workdir / "pwned"
    evil = workdir / "evil.yaml"
    evil.write_text(f'trainer:\n  max_epochs: !!{tag} ["touch {marker}"]\n')
    line = expect_user_error(
        capsys, ["fit", "--config", str(TINY_CONFIG), "--config", str(evil), "--print_config"]
    )
    assert f"could not determine a constructor for the tag 'tag:yaml.org,2002:{tag}'" in line
    expect_user_error(
        capsys, ["fit", "--config", str(TINY_CONFIG), "--trainer.max_epochs", f'!!{tag} ["x"]']
    )
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
    module = SyntheticCAMERDataModule(
        str(root), streams=streams, synthetic=synthetic, on_error="skip"
    )
    victim = root / "HL-UTT" / "camer_000000.npy"
    outside = tmp_path / "outside.npy"
    victim.rename(outside)
    victim.symlink_to(outside)
    module.setup("fit")
    assert [row["name"] for row in module.skipped] == ["camer_000000"]
    assert "outside" in module.skipped[0]["reason"] and module.skipped[0]["field"] == "name"
    assert len(module.datasets["train"]) == 7
