"""The bad-input suite: every loader gets corrupt, truncated, empty, wrongly typed and wrongly
shaped inputs made here, and must raise an error naming the file and the field (or, with
``on_error="skip"``, list the sample in the skip report).

Cases already covered elsewhere are not repeated: bad rows and labels of each annotation format
(tests/data/formats/test_formats_bad_input.py), broken media
(tests/data/components/test_media.py), NaN/shape/missing features through the MER2023 data
module (tests/data/test_datamodules_real.py), crafted pickles and escaping names
(tests/io/test_safe_loading.py).
"""

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from src.cli import main
from src.core.label_space import MER2023
from src.core.streams import StreamSpec
from src.data.camer import manifest as camer
from src.data.camer.datamodule import CAMERDataModule, SyntheticCAMERDataModule
from src.data.camer.synthetic import SyntheticCAMERConfig, generate_synthetic_camer
from src.data.components.feature_store import FeatureFileError, FeatureStore
from src.data.components.media import MediaDecodeError, decode_audio
from src.data.components.tokenizer import load_tokenizer
from src.data.formats import dfew, emer, mer2023, subtitles
from src.data.formats.rows import FormatError
from src.evaluation.score import main as score_main
from src.io.checkpoint_io import (
    CorruptCheckpointError,
    UnsafeCheckpointError,
    load_checkpoint_safely,
)
from src.metrics.emotion_vocabulary import EmotionVocabulary
from tests.fault_injection import SMALL, expect_user_error, tiny_config

# Not UTF-8: what a corrupt or binary file looks like to a text reader.
GARBAGE = b"\xff\xfe\x00\x91garbage\x80\x81\xc3" * 16
MANIFEST_HEADER = "name,split,subset,label,video_label,audio_label\n"
STREAM = StreamSpec(name="audio", feature_dir="HL-UTT", modality="audio", dim=4, tokens=1)


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def npz_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=array)
    return buffer.getvalue()


def claimed_npy(shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"\0" * 64) -> bytes:
    """A .npy whose header claims ``shape`` (e.g. terabytes) but which holds only ``data``."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + data


def ckpt_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


GOOD_NPY = npy_bytes(np.arange(4, dtype=np.float32))
GOOD_CKPT = ckpt_bytes({"state_dict": {"w": torch.zeros(64)}, "epoch": 0})


@dataclass
class Case:
    """One bad input: ``content`` goes to ``file`` (under tmp_path); ``load(tmp_path)`` reads it
    and must raise one of ``errors`` whose message names the file, ``field`` and ``words``."""

    loader: str
    kind: str
    file: str
    content: bytes | str
    load: Callable[[Path], Any]
    field: str
    words: str
    errors: tuple[type[BaseException], ...] = (ValueError,)


def feature(tmp: Path) -> Any:
    return FeatureStore(tmp, [STREAM]).load_stream(STREAM, "s1")


def manifest(tmp: Path) -> Any:
    return camer.read_manifest(tmp / "manifest.csv", MER2023)


def subset_json(tmp: Path) -> Any:
    return camer.read_subset_json(tmp / "consistent.json", MER2023)


def vocabulary(tmp: Path) -> Any:
    return EmotionVocabulary.load(tmp / "format.csv")


def synonyms(tmp: Path) -> Any:
    return EmotionVocabulary.load(None, tmp / "synonyms.json")


FEATURE = "HL-UTT/s1.npy"
NPY = "feature 'audio'"
CASES = [
    # ---- feature files (.npy)
    Case("feature", "corrupt", FEATURE, GARBAGE, feature, NPY, "not a readable .npy"),
    Case("feature", "truncated", FEATURE, GOOD_NPY[:-7], feature, NPY, "not a readable .npy"),
    Case("feature", "empty", FEATURE, b"", feature, NPY, "not a readable .npy"),
    Case(
        "feature",
        "pickled objects",
        FEATURE,
        npy_bytes(np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True),
        feature,
        NPY,
        "not a readable .npy",
    ),
    Case("feature", "text dtype", FEATURE, npy_bytes(np.array(list("abcd"))), feature, NPY, "<U1"),
    Case("feature", "bool dtype", FEATURE, npy_bytes(np.ones(4, bool)), feature, NPY, "dtype bool"),
    Case("feature", "2-d", FEATURE, npy_bytes(np.zeros((2, 4))), feature, NPY, "shape (2, 4)"),
    Case("feature", "scalar", FEATURE, npy_bytes(np.float32(1.0)), feature, NPY, "shape ()"),
    Case(
        "feature",
        "float64 beyond float32",
        FEATURE,
        npy_bytes(np.array([1.0, 2.0, 1e300, 4.0])),
        feature,
        NPY,
        "beyond the float32 range",
    ),
    Case(
        "feature",
        "complex",
        FEATURE,
        npy_bytes(np.arange(4) * (1 + 2j)),
        feature,
        NPY,
        "is complex",
    ),
    Case("feature", "npz saved as npy", FEATURE, npz_bytes(np.zeros(4)), feature, NPY, ".npz"),
    Case(
        "feature",
        "header claims terabytes",
        FEATURE,
        claimed_npy((2**40,)),
        feature,
        NPY,
        f"shape ({2**40},)",
    ),
    Case(
        "feature",
        "header claims more data than the file has",
        FEATURE,
        claimed_npy((4,), "<f8", data=b"\0" * 8),
        feature,
        NPY,
        "the header claims 32 data bytes, the file has 8",
    ),
    Case(
        "feature",
        "huge header",
        FEATURE,
        b"\x93NUMPY\x02\x00" + (10**6).to_bytes(4, "little") + b" " * 10**6,
        feature,
        NPY,
        "not a readable .npy",
    ),
    # ---- CA-MER manifest
    Case(
        "manifest",
        "corrupt",
        "manifest.csv",
        MANIFEST_HEADER.encode() + GARBAGE,
        manifest,
        "<encoding>",
        "not UTF-8",
    ),
    Case(
        "manifest",
        "truncated",
        "manifest.csv",
        MANIFEST_HEADER + "a,train,,happy,,\nb,tra",
        manifest,
        "<row>",
        "expected 6 fields",
    ),
    Case("manifest", "empty", "manifest.csv", "", manifest, "<header>", "file is empty"),
    Case(
        "manifest",
        "missing column",
        "manifest.csv",
        "name,split,label\na,train,happy\n",
        manifest,
        "subset",
        "missing column",
    ),
    # ---- CA-MER subset JSON
    Case("subset json", "corrupt", "consistent.json", GARBAGE, subset_json, "<encoding>", "UTF-8"),
    Case(
        "subset json",
        "truncated",
        "consistent.json",
        '[{"name": "a", "label": "hap',
        subset_json,
        "<json>",
        "invalid JSON",
    ),
    Case("subset json", "empty", "consistent.json", "", subset_json, "<json>", "invalid JSON"),
    Case("subset json", "not a list", "consistent.json", "42", subset_json, "<root>", "JSON list"),
    Case(
        "subset json",
        "name is a list",
        "consistent.json",
        json.dumps([{"name": ["a"], "label": "happy"}]),
        subset_json,
        "name",
        "must be text, got list",
    ),
    Case(
        "subset json",
        "reason is an object",
        "consistent.json",
        json.dumps([{"name": "a", "label": "happy", "reason": {"x": 1}}]),
        subset_json,
        "reason",
        "must be text, got dict",
    ),
    Case(
        "subset json",
        "entries are lists",
        "consistent.json",
        json.dumps([["a", "happy"]]),
        subset_json,
        "<entry>",
        "not an object",
    ),
    # ---- label files of the other data sets
    Case(
        "mer2023 labels",
        "corrupt",
        "train-label.csv",
        b"name,discrete,valence\n" + GARBAGE,
        lambda t: mer2023.read_label_csv(t / "train-label.csv"),
        "<encoding>",
        "not UTF-8",
    ),
    Case(
        "mer2023 labels",
        "truncated",
        "train-label.csv",
        "name,discrete,valence\na,happy,1\nb,sa",
        lambda t: mer2023.read_label_csv(t / "train-label.csv"),
        "<row>",
        "expected 3 fields",
    ),
    Case(
        "emotion-llama list",
        "corrupt",
        "list.txt",
        GARBAGE,
        lambda t: mer2023.read_emotion_llama_list(t / "list.txt"),
        "<encoding>",
        "not UTF-8",
    ),
    Case(
        "dfew split",
        "corrupt",
        "test/set_1.csv",
        GARBAGE,
        lambda t: dfew.read_split(t / "test" / "set_1.csv"),
        "<encoding>",
        "not UTF-8",
    ),
    Case(
        "dfew split",
        "empty",
        "test/set_1.csv",
        "",
        lambda t: dfew.read_split(t / "test" / "set_1.csv"),
        "<header>",
        "not a DFEW split",
    ),
    Case(
        "dfew split",
        "truncated",
        "test/set_1.csv",
        "video_name,label\n1,3\n2,",
        lambda t: dfew.read_split(t / "test" / "set_1.csv"),
        "label",
        "not an integer label",
    ),
    Case(
        "emer",
        "corrupt",
        "gt.csv",
        b"names,emotions,subtitles,reasons\n" + GARBAGE,
        lambda t: emer.read_emer_v1(t / "gt.csv"),
        "<encoding>",
        "not UTF-8",
    ),
    Case(
        "emer",
        "empty",
        "gt-eng.csv",
        "",
        lambda t: emer.read_emer_v2(t / "gt-eng.csv"),
        "<header>",
        "file is empty",
    ),
    # ---- subtitles
    Case(
        "subtitles",
        "corrupt",
        "transcription.csv",
        b"name,english\n" + GARBAGE,
        lambda t: subtitles.read_subtitles(t / "transcription.csv"),
        "<encoding>",
        "not UTF-8",
    ),
    Case(
        "subtitles",
        "empty",
        "transcription.csv",
        "",
        lambda t: subtitles.read_subtitles(t / "transcription.csv"),
        "<header>",
        "file is empty",
    ),
    Case(
        "subtitles",
        "wrongly shaped",
        "transcription.csv",
        "name,chinese\ns1,x\n",
        lambda t: subtitles.read_subtitles(t / "transcription.csv"),
        "english",
        "missing column",
    ),
    Case(
        "mer2023 subtitles",
        "corrupt",
        "transcription.csv",
        b"name,chinese,english\n" + GARBAGE,
        lambda t: subtitles.read_subtitles(t / "transcription.csv"),
        "<encoding>",
        "not UTF-8",
    ),
    # ---- emotion vocabulary and synonyms
    Case("vocabulary", "corrupt", "format.csv", GARBAGE, vocabulary, "<encoding>", "not UTF-8"),
    Case("vocabulary", "empty", "format.csv", "", vocabulary, "'name'", "missing column"),
    Case("synonyms", "corrupt", "synonyms.json", GARBAGE, synonyms, "synonym", "cannot read"),
    Case("synonyms", "truncated", "synonyms.json", '[["a", "b"]', synonyms, "synonym", "read"),
    Case("synonyms", "wrong type", "synonyms.json", '{"a": 1}', synonyms, "synonym", "lists"),
    # ---- tokenizer directory
    Case(
        "tokenizer",
        "corrupt",
        "tok/tokenizer.json",
        GARBAGE,
        lambda t: load_tokenizer(t / "tok"),
        "tokenizer",
        "cannot load",
    ),
    Case(
        "tokenizer",
        "truncated",
        "tok/tokenizer.json",
        '{"version": "1.0", "model": {"type": "Wo',
        lambda t: load_tokenizer(t / "tok"),
        "tokenizer",
        "cannot load",
    ),
    # ---- checkpoints
    Case(
        "checkpoint",
        "corrupt",
        "x.ckpt",
        GARBAGE,
        lambda t: load_checkpoint_safely(t / "x.ckpt"),
        "checkpoint",
        "refused",
        (UnsafeCheckpointError,),
    ),
    Case(
        "checkpoint",
        "truncated",
        "x.ckpt",
        GOOD_CKPT[: len(GOOD_CKPT) // 2],
        lambda t: load_checkpoint_safely(t / "x.ckpt"),
        "checkpoint",
        "truncated or corrupt",
        (CorruptCheckpointError,),
    ),
    Case(
        "checkpoint",
        "empty",
        "x.ckpt",
        b"",
        lambda t: load_checkpoint_safely(t / "x.ckpt"),
        "checkpoint",
        "empty",
        (CorruptCheckpointError,),
    ),
    Case(
        "checkpoint",
        "not a dict",
        "x.ckpt",
        ckpt_bytes([torch.zeros(2)]),
        lambda t: load_checkpoint_safely(t / "x.ckpt"),
        "checkpoint",
        "must hold a dict, found list",
        (CorruptCheckpointError,),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.loader}-{c.kind}" for c in CASES])
def test_loader_names_file_and_field(tmp_path, case):
    path = tmp_path / case.file
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(case.content, bytes):
        path.write_bytes(case.content)
    else:
        path.write_text(case.content, encoding="utf-8")
    with pytest.raises(case.errors) as info:
        case.load(tmp_path)
    message = str(info.value)
    named = str(path) if case.loader != "tokenizer" else str(path.parent)
    assert named in message, message
    assert case.field in message and case.words in message, message
    if isinstance(info.value, FormatError | FeatureFileError):
        assert info.value.field == case.field


# -------------------------------------------------------- skipping through a data module


def test_camer_data_module_skips_every_broken_feature_and_lists_it(tmp_path):
    streams = [STREAM.__class__(**{**STREAM.__dict__, "dim": 8})]
    root = tmp_path / "camer"
    config = SyntheticCAMERConfig(seed=0, n_train=10, n_val=4, n_test=6)
    SyntheticCAMERDataModule(str(root), streams=streams, synthetic=config)  # writes the data set
    folder = root / "HL-UTT"
    broken = {
        "camer_000001": (GARBAGE, "not a readable .npy"),
        "camer_000002": (npy_bytes(np.zeros(8, np.float32))[:-5], "not a readable .npy"),
        "camer_000003": (b"", "not a readable .npy"),
        "camer_000004": (npy_bytes(np.array(["x"] * 8)), "is not numeric"),
        "camer_000005": (npy_bytes(np.zeros((8, 2), np.float32)), "shape (8, 2)"),
    }
    for name, (content, _) in broken.items():
        (folder / f"{name}.npy").write_bytes(content)
    with pytest.raises(FeatureFileError) as info:
        SyntheticCAMERDataModule(str(root), streams=streams, synthetic=config).setup("fit")
    assert str(folder / "camer_000001.npy") in str(info.value)

    module = SyntheticCAMERDataModule(str(root), streams=streams, synthetic=config, on_error="skip")
    module.setup("fit")
    listed = {row["name"]: row for row in module.skipped}
    assert set(listed) == set(broken)
    for name, (_, words) in broken.items():
        row = listed[name]
        assert row["file"] == str(folder / f"{name}.npy") and row["field"] == "feature 'audio'"
        assert words in row["reason"], row
    kept = {r.name for split in module.datasets.values() for r in split.records}
    assert not kept & set(broken) and len(kept) == 20 - len(broken)


def test_camer_subtitles_honour_on_error(tmp_path):
    """CA-MER's subtitle CSV goes through the one subtitle reader: a malformed row or a
    duplicate name stops the run naming file, line and field, or is skipped into the report."""
    streams = [STREAM.__class__(**{**STREAM.__dict__, "dim": 8})]
    root = tmp_path / "camer"
    config = SyntheticCAMERConfig(seed=0, n_train=10, n_val=4, n_test=6)
    SyntheticCAMERDataModule(str(root), streams=streams, synthetic=config)  # writes the data set
    subtitle_csv = root / "transcription.csv"
    lines = subtitle_csv.read_text(encoding="utf-8").splitlines()
    n = len(lines)
    lines += ["camer_000001,said twice", "camer_000002,one,too many"]
    subtitle_csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(FormatError) as info:
        SyntheticCAMERDataModule(str(root), streams=streams, synthetic=config).setup("fit")
    assert info.value.file == str(subtitle_csv) and info.value.field == "name"
    assert info.value.line == n + 1

    module = SyntheticCAMERDataModule(str(root), streams=streams, synthetic=config, on_error="skip")
    module.setup("fit")
    listed = {
        (row["field"], row["line"]) for row in module.skipped if row["file"] == str(subtitle_csv)
    }
    assert listed == {("name", n + 1), ("<row>", n + 2)}
    kept = {r.name for split in module.datasets.values() for r in split.records}
    assert len(kept) == 20  # a bad subtitle row drops no sample


def test_feature_holes_raise_one_error_type_or_are_skipped_and_listed(tmp_path):
    """Values beyond float32, complex arrays, an .npz saved as .npy, a header claiming terabytes
    and a name too long for the file system: one error type naming file and field, and with
    ``on_error: skip`` one skip-report row each (never a MemoryError or OSError)."""
    streams = [STREAM.__class__(**{**STREAM.__dict__, "dim": 8})]
    root = generate_synthetic_camer(
        tmp_path / "camer", streams, SyntheticCAMERConfig(seed=0, n_train=10, n_val=4, n_test=6)
    )
    folder = root / "HL-UTT"
    broken = {
        "camer_000001": (npy_bytes(np.full(8, 1e300)), "beyond the float32 range"),
        "camer_000002": (npy_bytes(np.ones(8, np.complex64)), "is complex"),
        "camer_000003": (npz_bytes(np.zeros(8, np.float32)), ".npz"),
        "camer_000004": (claimed_npy((2**40,)), f"shape ({2**40},)"),
    }
    for name, (content, _) in broken.items():
        (folder / f"{name}.npy").write_bytes(content)
    long_name = "x" * 300  # a valid sample name no file system can store
    with (root / "manifest.csv").open("a", encoding="utf-8") as handle:
        handle.write(f"{long_name},train,consistent,happy,happy,happy\n")

    for name, (_, words) in broken.items():
        with pytest.raises(FeatureFileError) as info:
            FeatureStore(root, streams).load_stream(streams[0], name)
        assert info.value.path == folder / f"{name}.npy" and info.value.field == "feature 'audio'"
        assert str(folder / f"{name}.npy") in str(info.value) and words in str(info.value)
    with pytest.raises(FeatureFileError) as info:
        FeatureStore(root, streams).load(long_name)
    assert info.value.field == "name" and long_name in str(info.value.path)
    with pytest.raises(FeatureFileError):
        CAMERDataModule(str(root), streams=streams).setup("fit")

    module = CAMERDataModule(str(root), streams=streams, on_error="skip")
    module.setup("fit")
    listed = {row["name"]: row for row in module.skipped}
    assert set(listed) == {*broken, long_name}
    for name, (_, words) in broken.items():
        assert listed[name]["file"] == str(folder / f"{name}.npy"), listed[name]
        assert listed[name]["field"] == "feature 'audio'" and words in listed[name]["reason"]
    assert listed[long_name]["field"] == "name" and "too long" in listed[long_name]["reason"]
    kept = {r.name for split in module.datasets.values() for r in split.records}
    assert len(kept) == 20 - len(broken) and not kept & set(listed)


# ----------------------------------------------------------------------- other entry points


def test_audio_with_nan_samples(tmp_path):
    wav = tmp_path / "nan.wav"
    samples = np.zeros(1600, np.float32)
    samples[100] = np.nan
    sf.write(wav, samples, 16_000, subtype="FLOAT")
    with pytest.raises(MediaDecodeError) as info:
        decode_audio(wav)
    assert (info.value.path, info.value.field) == (str(wav), "audio")
    assert "NaN" in info.value.reason


def test_score_reports_a_corrupt_prediction_file(tmp_path, capsys):
    path = tmp_path / "predictions.csv"
    path.write_bytes(b"name,label,prediction\n" + GARBAGE)
    assert score_main(["--predictions", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "<encoding>" in err and "not UTF-8" in err


def test_config_values_of_the_wrong_type_or_broken_yaml(workdir, capsys):
    wrong = workdir / "wrong.yaml"
    wrong.write_text("trainer:\n  max_epochs: many\n")
    broken = workdir / "broken.yaml"
    broken.write_text("trainer: [unclosed\n")
    for config, words in ((wrong, "option trainer.max_epochs"), (broken, "Problems parsing")):
        line = expect_user_error(
            capsys, ["fit", "--config", str(tiny_config(workdir)), "--config", str(config)]
        )
        assert words in line


def test_checkpoint_of_another_shape_or_with_non_tensors_is_refused_naming_the_key(workdir, capsys):
    config = tiny_config(workdir, data={"synthetic": SMALL})
    cli = main(
        ["fit", "--config", str(config), "--trainer.max_epochs", "1", "--test_after_fit", "false"]
    )
    checkpoint = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if "lora" in k.lower())
    reshaped = {**checkpoint, "state_dict": {**checkpoint["state_dict"], key: torch.zeros(3, 5)}}
    torch.save(reshaped, workdir / "reshaped.ckpt")
    message = expect_user_error(
        capsys, ["test", "--config", str(config), "--ckpt_path", str(workdir / "reshaped.ckpt")]
    )
    assert str(workdir / "reshaped.ckpt") in message and repr(key) in message
    assert "(3, 5)" in message and str(tuple(checkpoint["state_dict"][key].shape)) in message
    typed = {**checkpoint, "state_dict": {**checkpoint["state_dict"], key: "not a tensor"}}
    torch.save(typed, workdir / "typed.ckpt")
    line = expect_user_error(
        capsys, ["test", "--config", str(config), "--ckpt_path", str(workdir / "typed.ckpt")]
    )
    assert f"state_dict[{key!r}] is a str" in line
