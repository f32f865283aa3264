"""`extract`: clips written with PyAV -> encoders -> feature store -> `fit` on the store; resuming,
broken clips (raise vs skip + report), and online encoders giving the store's predictions."""

import csv
import json
import os
from pathlib import Path

import lightning as L
import mlflow
import numpy as np
import pytest
import torch

from src.cli import main
from src.core.streams import StreamSpec
from src.data.components.media import MediaDecodeError
from src.data.components.media_source import MediaSpec
from src.data.mer2023_datamodule import MER2023DataModule
from src.models.backbones.projected_causal_lm import ProjectedCausalLM
from src.models.emotion_module import EmotionLLMModule
from tests.conftest import REPO, TINY_CONFIG
from tests.fault_injection import expect_user_error
from tests.mini_mer import (
    BROKEN,
    SSL_HOP320,
    STREAMS,
    load_encoders,
    save_encoders,
    write_mer2023,
)

CONF = REPO / "tests" / "conf"
EXTRACT = CONF / "extract_tiny.yaml"
DATA = CONF / "mer2023_tiny.yaml"
ONLINE = CONF / "online_encoders.yaml"
ROOT = "mer2023_tiny"  # the data root the tiny configs name, relative to the working folder
BACKBONE = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def store_files(root: Path, names: list[str]) -> list[Path]:
    return [root / s.feature_dir / f"{n}.npy" for s in STREAMS for n in names]


def read_report(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


@pytest.fixture
def mini(workdir: Path) -> dict[str, list[str]]:
    """The tiny MER2023 folder and encoders in the working folder (where the configs point)."""
    save_encoders(workdir / "encoders")
    return write_mer2023(workdir / ROOT)


def test_extract_writes_the_store_resumes_and_fit_trains_on_it(mini, workdir, capsys):
    root = workdir / ROOT
    names = mini["train"] + mini["test"]
    assert main(["extract", "--config", str(EXTRACT)]) == 0
    files = store_files(root, names)
    assert all(f.is_file() for f in files)
    for stream in STREAMS:
        vector = np.load(root / stream.feature_dir / f"{names[0]}.npy")
        assert vector.shape == (stream.dim,) and vector.dtype == np.float32
        assert np.isfinite(vector).all() and vector.std() > 0
    # Different clips give different features (the encoders see the media, not a constant).
    audio = [np.load(root / "HL-UTT" / f"{n}.npy") for n in names[:2]]
    assert not np.allclose(*audio)
    assert not list(root.rglob("*.tmp"))  # atomic writes leave no temporary files

    # Resumable: a second run writes nothing; a deleted file is the only one rewritten.
    stamps = {f: f.stat().st_mtime_ns for f in files}
    capsys.readouterr()
    assert main(["extract", "--config", str(EXTRACT)]) == 0
    assert f"0 written, {len(names)} already done" in capsys.readouterr().out
    lost = root / "HL-UTT" / f"{names[3]}.npy"
    kept = np.load(lost)
    lost.unlink()
    assert main(["extract", "--config", str(EXTRACT)]) == 0
    assert f"1 written, {len(names) - 1} already done" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(lost), kept, atol=1e-6)
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files if f != lost)

    # Train on the store, with one bad feature file skipped and reported to MLflow.
    np.save(root / "mae_340_UTT" / f"{mini['train'][0]}.npy", np.full(32, np.nan, np.float32))
    cli = main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--data",
            str(DATA),
            "--data.init_args.on_error",
            "skip",
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step > 0
    assert len(cli.datamodule.datasets["train"]) + len(cli.datamodule.datasets["val"]) == 7
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["tests"]).iloc[0]
    assert run["metrics.test/acc"] == run["metrics.test/acc"]  # tested after fit, not NaN
    text = Path(
        mlflow.MlflowClient().download_artifacts(run.run_id, "skipped_samples.csv", str(workdir))
    ).read_text()
    assert mini["train"][0] in text and "NaN" in text and "mae_340_UTT" in text


def test_broken_clips_raise_or_are_skipped_and_reported(workdir, capsys):
    save_encoders(workdir / "encoders")
    splits = write_mer2023(workdir / ROOT, n_train=3, n_test=1, broken=True)
    root = workdir / ROOT
    # raise: the first broken clip stops the run with its file and field; exit code 2.
    assert main(["extract", "--config", str(EXTRACT)]) == 2
    error = capsys.readouterr().err
    assert "extract: error:" in error and "bad_truncated.mp4: video: truncated" in error

    assert main(["extract", "--config", str(EXTRACT), "--on_error", "skip"]) == 0
    report = read_report(root / "extract_report.csv")
    assert set(report) == set(BROKEN)
    expected = {
        "bad_truncated": ("video", "truncated"),
        "bad_noaudio": ("audio", "no audio stream"),
        "bad_emptyaudio": ("audio", "zero-length"),
        "bad_junk": ("container", "cannot open"),
        "bad_missing": ("path", "no clip"),
    }
    for name, (field, words) in expected.items():
        assert report[name]["field"] == field and words in report[name]["reason"], report[name]
        assert name in report[name]["file"]
    good = [n for n in splits["train"] + splits["test"] if n not in BROKEN]
    assert all(f.is_file() for f in store_files(root, good))
    assert not any(f.exists() for f in store_files(root, list(BROKEN)))


@pytest.mark.parametrize("check", ["probe", "decode"])
def test_media_source_checks_clips_at_setup(workdir, check):
    splits = write_mer2023(workdir / ROOT, n_train=3, n_test=1, broken=True)
    kwargs = dict(
        splits={"train": ["train-label.csv"], "test": ["test-label.csv"]},
        val_fraction=0.0,
        streams=STREAMS,
        source="media",
        media=MediaSpec(num_frames=4, frame_size=32),
        media_check=check,
    )
    with pytest.raises(MediaDecodeError, match="bad_truncated|bad_noaudio") as info:
        MER2023DataModule(ROOT, **kwargs).setup()
    assert info.value.field in ("video", "audio")
    data = MER2023DataModule(ROOT, on_error="skip", **kwargs)
    data.setup()
    skipped = {row["name"]: row["field"] for row in data.skipped}
    # Headers alone cannot see a truncated stream or an empty audio track; decoding can.
    header_visible = {"bad_noaudio": "audio", "bad_junk": "container", "bad_missing": "path"}
    assert skipped == (
        header_visible
        if check == "probe"
        else {**header_visible, "bad_truncated": "video", "bad_emptyaudio": "audio"}
    )
    kept = [r.name for r in data.datasets["train"].records]
    assert kept == [n for n in splits["train"] if n not in skipped]
    if check == "decode":
        item = data.datasets["train"][0]
        assert item["frames"].shape == (4, 3, 32, 32) and item["frames"].dtype == torch.uint8
        assert item["audio"].ndim == 1 and "features" not in item


def _predict(module: EmotionLLMModule, data: MER2023DataModule) -> dict[str, torch.Tensor]:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    out = trainer.predict(module, datamodule=data)
    return {n: s for batch in out for n, s in zip(batch["names"], batch["scores"], strict=True)}


def _module(data: MER2023DataModule, encoders: dict) -> EmotionLLMModule:
    torch.manual_seed(0)
    return EmotionLLMModule(
        backbone=ProjectedCausalLM(config=BACKBONE),
        tokenizer=data.tokenizer_path,
        labels=data.label_names,
        streams=data.streams,
        encoders=encoders,
    )


def assert_online_equals_store(
    root: str, splits: dict, media: MediaSpec, dirs: dict, streams: list[StreamSpec], **extra
) -> None:
    """Extract with the encoders, then predict from the store and from raw media (same weights);
    the label scores agree within 1e-5."""
    kwargs = dict(splits=splits, val_fraction=0.0, streams=streams, media=media, **extra)
    online = MER2023DataModule(root, source="media", eval_batch_size=3, **kwargs)
    stored = MER2023DataModule(root, source="features", eval_batch_size=2, **kwargs)
    module = _module(online, load_encoders(dirs))
    names = [r.name for r in online.load_records()]
    from src.commands.extract import extract_features

    result = extract_features(
        names, online.media_loader(), module.encoders, streams, root, batch_size=4, progress=False
    )
    assert result.written == len(names) and not len(result.report)
    from_media, from_store = _predict(module, online), _predict(module, stored)
    assert set(from_media) == set(from_store) == set(names)
    for name in names:
        torch.testing.assert_close(from_media[name], from_store[name], atol=1e-5, rtol=0)
    # Sanity: the scores depend on the features (a changed store changes the prediction).
    first = Path(root) / streams[0].feature_dir / f"{names[0]}.npy"
    np.save(first, np.load(first) + 1.0)
    shifted = _predict(module, MER2023DataModule(root, source="features", **kwargs))
    assert not torch.allclose(shifted[names[0]], from_store[names[0]], atol=1e-4)


def test_online_encoders_give_the_store_predictions(workdir):
    save_encoders(workdir / "encoders")
    write_mer2023(workdir / ROOT, n_train=2, n_test=5)
    dirs = {k: workdir / "encoders" / k for k in ("vit", "clip", "hubert")}
    assert_online_equals_store(
        ROOT,
        {"test": ["test-label.csv"]},
        MediaSpec(num_frames=4, frame_size=32),
        dirs,
        STREAMS,
    )


@pytest.mark.slow
def test_online_encoders_on_the_real_clips(realdata, workdir):
    """The six real MER2023 clips (H.264 + AAC 44.1 kHz stereo, up to 1080p); one middle frame
    each keeps the decoding cost down."""
    from src.core.label_space import MER2023
    from src.data.camer.synthetic import PROMPT_WORDS
    from src.data.components.tokenizer import build_word_tokenizer

    mini = realdata / "mer2023-mini"
    dirs = save_encoders(workdir / "encoders", audio_config=SSL_HOP320)
    root = workdir / "store"
    words = (mini / "transcription.csv").read_text(encoding="utf-8").split()
    build_word_tokenizer([*PROMPT_WORDS, *words, *MER2023.labels], root / "tokenizer")
    assert_online_equals_store(
        str(root),
        {"test": [str(mini / "label.csv")]},
        MediaSpec(video_dir=str(mini / "video"), strategy="middle", frame_size=32),
        dirs,
        STREAMS,
        subtitles=str(mini / "transcription.csv"),
    )


def test_fit_with_online_encoders_through_the_cli(mini, workdir):
    """The same tiny run on raw media: encoders from the model config, `source: media`."""
    cli = main(
        [
            "fit",
            "--config",
            str(TINY_CONFIG),
            "--data",
            str(DATA),
            "--config",
            str(ONLINE),
            "--test_after_fit",
            "false",
        ]
    )
    assert cli.trainer.global_step > 0
    assert set(cli.model.encoders) == {"face", "video", "audio"}
    assert not any(p.requires_grad for p in cli.model.encoders.parameters())
    # Frozen encoders are not in the checkpoint (rebuilt from config, like the backbone).
    ckpt = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert not any(k.startswith("encoders.") for k in ckpt["state_dict"])
    assert not (workdir / ROOT / "HL-UTT").exists()  # nothing read from or written to a store


def test_extract_from_a_clip_folder(workdir, capsys):
    """`--clips` + `--names` instead of a data module; bad arguments exit with a message."""
    dirs = save_encoders(workdir / "encoders")
    write_mer2023(workdir / "d", n_train=3, n_test=0)
    (workdir / "names.txt").write_text("train_00\ntrain_02\n")
    args = [
        "extract",
        "--clips",
        "d/video",
        "--names",
        "names.txt",
        "--output",
        "out",
        "--streams",
        '[{"name": "audio", "feature_dir": "HL-UTT", "modality": "audio", "dim": 32}]',
        "--encoders",
        '{"audio": {"class_path": "src.models.encoders.AudioEncoder", '
        f'"init_args": {{"kind": "hubert", "pretrained": "{dirs["hubert"]}"}}}}}}',
        "--progress",
        "false",
    ]
    assert main(args) == 0
    written = sorted(os.listdir(workdir / "out" / "HL-UTT"))
    assert written == ["encoder.json", "train_00.npy", "train_02.npy"]
    # neither --data nor --clips
    assert "exactly one of --data" in expect_user_error(capsys, ["extract", "--encoders", "{}"])


@pytest.mark.parametrize("name", ["mer2023.yaml", "clips_tiny.yaml"])
def test_extract_example_configs_parse(name):
    from src.commands.extract import build_parser

    cfg = build_parser().parse_args(["--config", str(REPO / "conf" / "extract" / name)])
    assert set(cfg.encoders) >= {"face", "audio"}
    if name == "mer2023.yaml":
        assert cfg.data.class_path.endswith("MER2023DataModule") and cfg.device == "cuda"


def test_extract_writes_sequence_features(workdir):
    """Encoders with `tokens: N` write (N, dim) arrays for sequence streams (ViT patch tokens,
    HuBERT frames) that the feature store reads back."""
    from src.data.components.feature_store import FeatureStore

    dirs = save_encoders(workdir / "encoders")
    write_mer2023(workdir / "d", n_train=2, n_test=0)
    streams = [
        StreamSpec("face", "mae_340_UTT", "visual", 32, 4, sequence=True),
        StreamSpec("audio", "HL-UTT", "audio", 32, 3, sequence=True),
    ]
    encoders = (
        '{"face": {"class_path": "src.models.encoders.VisualEncoder", "init_args": '
        f'{{"kind": "vit", "pretrained": "{dirs["vit"]}", "tokens": 4}}}}, '
        '"audio": {"class_path": "src.models.encoders.AudioEncoder", "init_args": '
        f'{{"kind": "hubert", "pretrained": "{dirs["hubert"]}", "tokens": 3}}}}}}'
    )
    stream_arg = str([vars(s) for s in streams]).replace("True", "true")
    base = ["extract", "--clips", "d/video", "--output", "out", "--streams", stream_arg]
    assert main([*base, "--encoders", encoders, "--progress", "false"]) == 0
    features = FeatureStore(workdir / "out", streams).load("train_00")
    assert features["face"].shape == (4, 32) and features["audio"].shape == (3, 32)
    assert not np.allclose(features["face"][0], features["face"][1])  # distinct patch rows
    # A pooled encoder for a sequence stream is refused, naming the stream and the shape.
    pooled = encoders.replace(', "tokens": 4', "")
    args = [*base, "--encoders", pooled, "--progress", "false", "--overwrite", "true"]
    assert main(args) == 2


def test_a_store_refuses_to_be_extended_by_another_encoder(workdir, capsys):
    """A resumed or extended extract must use the encoder that wrote the folder: other weights
    (same config), other decoding settings, or a folder of unknown provenance are refused,
    naming the store and both identities, and nothing is written."""
    write_mer2023(workdir / "d", n_train=4, n_test=0)
    first, copy, other = (
        save_encoders(workdir / f"enc{i}", seed=s) for i, s in enumerate([0, 0, 1])
    )

    def extract(dirs: dict, names: str, output: str = "out", *extra: str) -> int:
        (workdir / "names.txt").write_text(names.replace(" ", "\n") + "\n")
        encoders = (
            '{"audio": {"class_path": "src.models.encoders.AudioEncoder", '
            f'"init_args": {{"kind": "hubert", "pretrained": "{dirs["hubert"]}"}}}}}}'
        )
        streams = '[{"name": "audio", "feature_dir": "HL-UTT", "modality": "audio", "dim": 32}]'
        return main(
            ["extract", "--clips", "d/video", "--names", "names.txt", "--output", output]
            + ["--streams", streams, "--encoders", encoders, "--progress", "false", *extra]
        )

    store = workdir / "out" / "HL-UTT"
    assert extract(first, "train_00 train_01") == 0
    record = json.loads((store / "encoder.json").read_text())
    assert record["identity"]["encoder"] == "src.models.encoders.AudioEncoder"
    assert record["pretrained"] == str(first["hubert"])  # where, not compared: the hash is
    # The same weights from another folder extend the store.
    assert extract(copy, "train_00 train_01 train_02") == 0
    capsys.readouterr()
    stamps = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}

    refusals = [
        ((other, "train_00 train_01 train_02 train_03"), "weights_sha256"),  # other weights
        ((first, "train_03", "out", "--media.max_audio_seconds", "0.5"), "decoding"),
    ]
    for args, changed in refusals:
        assert extract(*args) == 2
        # One error line (transformers' weight-loading bar may come before it).
        (err,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert err.startswith("extract: error: "), err
        assert "out/HL-UTT/encoder.json" in err and f"differs in {changed}" in err, err
        assert "recorded {" in err and "this run {" in err, err
        assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == stamps

    # Files of an unknown encoder (no record): extending them is refused too.
    foreign = workdir / "foreign" / "HL-UTT"
    foreign.mkdir(parents=True)
    np.save(foreign / "train_00.npy", np.zeros(32, np.float32))
    assert extract(first, "train_01", "foreign") == 2
    assert "no record of the encoder" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == ["train_00.npy"]
