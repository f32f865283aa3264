"""The MER2023, DFEW and EMER data modules on real annotation files and crafted ones: splits,
folds, subtitles, reasoning targets and their loss mask, task mixing, bad input (raise vs skip)."""

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from src.core.label_space import DFEW, MER2023
from src.core.records import SampleRecord
from src.data.camer.synthetic import PROMPT_WORDS
from src.data.components.batch import with_continuations
from src.data.components.prompt import encode_answer
from src.data.components.splits import carve_split
from src.data.components.tokenizer import build_word_tokenizer
from src.data.dfew_datamodule import DFEWDataModule
from src.data.emer_datamodule import EMERDataModule
from src.data.formats.rows import FormatError
from src.data.mer2023_datamodule import MER2023DataModule
from src.models.backbones.projected_causal_lm import ProjectedCausalLM
from src.models.emotion_module import EmotionLLMModule
from tests.mini_mer import EXTRA_WORDS, STREAMS, write_features

BACKBONE = dict(
    model_type="llama",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def tokenizer_for(root: Path, *texts: str) -> None:
    words = [w for t in texts for w in t.split()]
    build_word_tokenizer([*PROMPT_WORDS, *EXTRA_WORDS, *MER2023.labels, *words], root / "tokenizer")


# ------------------------------------------------------------------------------------ MER2023


def test_mer2023_on_the_real_labels_and_subtitles(realdata, tmp_path):
    mini = realdata / "mer2023-mini"
    labels = {r["name"]: r for r in csv_rows(mini / "label.csv")}
    subtitles = {r["name"]: r for r in csv_rows(mini / "transcription.csv")}
    write_features(tmp_path, list(labels))
    tokenizer_for(tmp_path, *(r["english"] for r in subtitles.values()))
    kwargs = dict(
        splits={"train": [str(mini / "label.csv")]},
        subtitles=str(mini / "transcription.csv"),
        val_fraction=0.34,
        streams=STREAMS,
        batch_size=3,
    )
    data = MER2023DataModule(str(tmp_path), **kwargs)
    data.setup()
    train, val = data.datasets["train"].records, data.datasets["val"].records
    assert len(val) == round(0.34 * len(labels)) and len(train) + len(val) == len(labels)
    assert len({r.label for r in val}) == len(val)  # stratified: one per class here
    for r in train + val:
        assert r.label == MER2023.normalise(labels[r.name]["discrete"])
        assert r.valence == pytest.approx(float(labels[r.name]["valence"]))
        assert r.subtitle == subtitles[r.name]["english"]
    assert not data.skipped
    batch = next(iter(data.train_dataloader()))
    assert batch["features"]["audio"].shape == (3, 32) and (batch["labels"] >= 0).all()
    assert [r.name for r in MER2023DataModule(str(tmp_path), **kwargs).load_records()] == [
        r.name for r in data.load_records()
    ]  # same files, same carving
    chinese = MER2023DataModule(str(tmp_path), language="chinese", **kwargs).load_records()
    assert {r.name: r.subtitle for r in chinese} == {n: s["chinese"] for n, s in subtitles.items()}


def test_mer2023_emotion_llama_layout(tmp_path):
    names = [f"sample_{i:08d}" for i in range(8)]
    lines = [f"{n} {30 + i} {MER2023.labels[i % 6].capitalize()}\n" for i, n in enumerate(names)]
    (tmp_path / "MERR_coarse_grained.txt").write_text("".join(lines[:4]))
    (tmp_path / "test.txt").write_text("".join(lines[4:]))
    sentences = {n: f"i said {i}" for i, n in enumerate(names)}
    rows = "".join(f"{n},{t}\n" for n, t in sentences.items())
    (tmp_path / "transcription_en_all.csv").write_text("name,sentence\n" + rows)
    data = MER2023DataModule(
        str(tmp_path),
        splits={"train": ["MERR_coarse_grained.txt"], "test": ["test.txt"]},
        subtitles="transcription_en_all.csv",
        val_fraction=0.0,
    )
    records = data.load_records()
    assert Counter(r.split for r in records) == {"train": 4, "test": 4}
    for i, r in enumerate(sorted(records, key=lambda r: r.name)):
        assert r.label == MER2023.labels[i % 6] and r.subtitle == sentences[r.name]


def test_val_carving_is_deterministic_stratified_and_order_free():
    records = [SampleRecord(f"c{i:03d}", "train", DFEW.labels[i % 7]) for i in range(70)]
    val = {r.name for r in carve_split(records, 0.2, seed=1) if r.split == "val"}
    again = {r.name for r in carve_split(records[::-1], 0.2, seed=1) if r.split == "val"}
    other = {r.name for r in carve_split(records, 0.2, seed=2) if r.split == "val"}
    assert val == again and val != other and len(val) == 14
    assert Counter(int(n[1:]) % 7 for n in val) == dict.fromkeys(range(7), 2)
    with pytest.raises(ValueError, match="would leave none"):
        carve_split(records[:1], 0.5)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35])
def test_val_carving_keeps_each_label_proportion_within_one_sample(fraction):
    # Imbalanced as real data: the rare label must keep its share (an equal count per label
    # once moved 40 of 47 `surprise` samples into validation).
    sizes = {"neutral": 400, "happy": 250, "sad": 120, "angry": 90, "worried": 60, "surprise": 47}
    sizes["fear"] = 1  # a single sample stays in training while another label can give one
    records = [
        SampleRecord(f"{label}_{i:03d}", "train", label)
        for label, n in sizes.items()
        for i in range(n)
    ]
    carved = carve_split(records, fraction, seed=3)
    val = Counter(r.label for r in carved if r.split == "val")
    total = sum(sizes.values())
    count = round(fraction * total)
    assert sum(val.values()) == count
    for label, n in sizes.items():
        share = count * n / total  # the label's proportional part of the carved records
        assert abs(val[label] - share) < 1, (label, val[label], share)
        assert val[label] < n  # every label keeps training samples
    assert Counter(r.label for r in carved) == sizes  # nothing lost or relabelled


# --------------------------------------------------------------------------------------- DFEW


def write_official_folds(root: Path, n_clips: int = 35) -> dict[int, set[str]]:
    """Five official folds: clip i is in test fold ``i % 5 + 1``, official label ``i % 7 + 1``."""
    base = root / "EmoLabel_DataSplit"
    test_of = {f"{i:05d}": i % 5 + 1 for i in range(1, n_clips + 1)}
    for fold in range(1, 6):
        for split in ("train", "test"):
            folder = base / f"{split}(single-labeled)"
            folder.mkdir(parents=True, exist_ok=True)
            ids = [c for c, k in test_of.items() if (k == fold) == (split == "test")]
            body = "".join(f"{int(c)},{int(c) % 7 + 1}\n" for c in ids)
            (folder / f"set_{fold}.csv").write_text("video_name,label\n" + body)
    return {k: {c for c, f in test_of.items() if f == k} for k in range(1, 6)}


def test_dfew_official_folds(tmp_path):
    test_sets = write_official_folds(tmp_path)
    all_clips = set().union(*test_sets.values())
    write_features(tmp_path, sorted(all_clips))
    tokenizer_for(tmp_path, *DFEW.labels)
    seen_test: set[str] = set()
    for fold in range(1, 6):
        data = DFEWDataModule(str(tmp_path), fold=fold, val_fraction=0.25, streams=STREAMS)
        records = data.load_records()
        by_split = {s: {r.name for r in records if r.split == s} for s in ("train", "val", "test")}
        assert by_split["test"] == test_sets[fold]
        assert by_split["train"] | by_split["val"] == all_clips - test_sets[fold]
        assert len(by_split["val"]) == round(0.25 * len(all_clips - test_sets[fold]))
        assert not by_split["train"] & by_split["val"]
        for r in records:  # official label k is DFEW class k - 1
            assert r.label == DFEW.labels[int(r.name) % 7]
        seen_test |= by_split["test"]
    assert seen_test == all_clips  # every clip is in exactly one test fold
    data = DFEWDataModule(str(tmp_path), fold=2, streams=STREAMS, batch_size=4)
    assert data.label_names == list(DFEW.labels)
    data.setup()
    batch = next(iter(data.test_dataloader()))
    assert set(batch["names"]) <= test_sets[2] and batch["labels"].max() < 7
    with pytest.raises(ValueError, match="fold must be one of"):
        DFEWDataModule(str(tmp_path), fold=6)
    (tmp_path / "EmoLabel_DataSplit" / "test(single-labeled)" / "set_4.csv").unlink()
    with pytest.raises(FileNotFoundError, match="set_4.csv"):
        DFEWDataModule(str(tmp_path), fold=4).load_records()


def test_dfew_dfer_clip_fold_with_the_real_test_split(realdata, tmp_path):
    real = realdata / "dfew" / "DFEW_set_1_test.txt"
    lines = [line.split() for line in real.read_text().splitlines() if line.strip()]
    expected = Counter(DFEW.labels[int(fields[2])] for fields in lines)
    (tmp_path / "DFEW_set_1_test.txt").symlink_to(real)
    train = "".join(f"/elsewhere/{90000 + i} 40 {i % 7}\n" for i in range(21))
    (tmp_path / "DFEW_set_1_train.txt").write_text(train)
    data = DFEWDataModule(str(tmp_path), fold=1, protocol="dfer-clip", val_fraction=1 / 7)
    records = data.load_records()
    test = [r for r in records if r.split == "test"]
    assert len(test) == len(lines) and Counter(r.label for r in test) == expected
    assert all(len(r.name) == 5 and r.name.isdigit() for r in test)
    assert Counter(r.split for r in records if r.split != "test") == {"train": 18, "val": 3}
    # The same fold in MAE-DFER's form (`split01/test.csv`, `<path>/<id> <label0>`).
    mae = tmp_path / "mae" / "split01"
    mae.mkdir(parents=True)
    (mae / "test.csv").symlink_to(realdata / "dfew" / "mae-dfer_split01_test.csv")
    (mae / "train.csv").write_text("".join(f"/x/{90000 + i} {i % 7}\n" for i in range(21)))
    mae_data = DFEWDataModule(str(tmp_path), fold=1, protocol="mae-dfer", split_dir="mae")
    mae_test = {r.name: r.label for r in mae_data.load_records() if r.split == "test"}
    assert mae_test == {r.name: r.label for r in test}
    # A clip in both the train and the test file of a fold is refused, naming both files.
    clash = lines[0][0].rsplit("/", 1)[1]
    (tmp_path / "DFEW_set_1_train.txt").write_text(train + f"/x/{clash} 10 0\n")
    with pytest.raises(FormatError, match="DFEW_set_1_train.txt") as info:
        DFEWDataModule(str(tmp_path), fold=1, protocol="dfer-clip").load_records()
    assert info.value.field == "name" and "DFEW_set_1_test.txt" in str(info.value)


# --------------------------------------------------------------------------------------- EMER


@pytest.fixture
def emer_v1(realdata, tmp_path) -> tuple[Path, list[dict[str, str]]]:
    path = realdata / "emer" / "gt-eng.csv"
    rows = csv_rows(path)
    write_features(tmp_path, [r["names"] for r in rows])
    tokenizer_for(tmp_path, *(r["reasons"] + " " + r["subtitles"] for r in rows))
    return path, rows


def _module(data) -> EmotionLLMModule:
    torch.manual_seed(0)
    return EmotionLLMModule(
        backbone=ProjectedCausalLM(config=BACKBONE),
        tokenizer=data.tokenizer_path,
        labels=data.label_names,
        streams=data.streams,
    )


def test_emer_v1_reason_targets_and_loss_mask(emer_v1, tmp_path):
    path, rows = emer_v1
    reasons = {r["names"]: r["reasons"] for r in rows}
    data = EMERDataModule(
        str(tmp_path), annotations=str(path), train_fraction=0.1, streams=STREAMS, batch_size=3
    )
    data.setup()
    assert len(data.datasets["train"]) == 10 and len(data.datasets["test"]) == 90
    batch = data.collator([data.datasets["train"][i] for i in range(3)])
    tok = data.collator.prompt_builder.tokenizer
    assert batch["tasks"] == ["reason"] * 3
    for name, target in zip(batch["names"], batch["target_ids"], strict=True):
        assert target == encode_answer(tok, reasons[name]) and len(target) > 20
    # The reason prompt (not the label question) is what the model reads.
    describe = tok.convert_tokens_to_ids("describe")
    assert (batch["input_ids"] == describe).any(dim=1).all()

    module = _module(data)
    model = module.model
    seq = with_continuations(batch, batch["target_ids"], model.tokenizer.pad_token_id)
    for row, target in enumerate(batch["target_ids"]):
        supervised = seq["lm_labels"][row][seq["lm_labels"][row] != -100]
        assert supervised.tolist() == target  # exactly the reasoning tokens (+ EOS)
        where = (seq["lm_labels"][row] != -100).nonzero().squeeze(1)
        assert torch.equal(seq["input_ids"][row, where], supervised)
    # The loss is the mean next-token cross-entropy over those positions only.
    out = model.run_backbone(
        seq["input_ids"],
        seq["attention_mask"],
        seq["modality_ids"],
        seq["stream_ids"],
        seq["features"],
    )
    logits, labels = out.logits[:, :-1].float(), seq["lm_labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(model.lm_loss(batch), manual, atol=1e-5, rtol=1e-5)
    # Changing a prompt token the loss does not supervise changes the loss only through
    # the context, never by being a target: its label position stays -100.
    prompt_len = int((batch["modality_ids"][0] >= 0).sum())
    assert (seq["lm_labels"][0, :prompt_len] == -100).all()


def test_emer_emotion_task_targets_are_label_words(emer_v1, tmp_path):
    path, rows = emer_v1
    labels = {r["names"]: MER2023.normalise(r["emotions"]) for r in rows}
    data = EMERDataModule(
        str(tmp_path), annotations=str(path), task="emotion", train_fraction=0.1, streams=STREAMS
    )
    data.setup()
    tok = data.collator.prompt_builder.tokenizer
    batch = data.collator([data.datasets["train"][i] for i in range(4)])
    for name, target, label in zip(
        batch["names"], batch["target_ids"], batch["labels"].tolist(), strict=True
    ):
        assert target == encode_answer(tok, labels[name]) and label == data.label_names.index(
            labels[name]
        )


def test_task_mixing(emer_v1, tmp_path):
    path, rows = emer_v1
    kwargs = dict(annotations=str(path), train_fraction=0.2, streams=STREAMS)
    mixed = EMERDataModule(str(tmp_path), tasks={"emotion": 1.0, "reason": 0.5}, **kwargs)
    mixed.setup()
    train = mixed.datasets["train"]
    n = 20
    assert Counter(train.tasks) == {"emotion": n, "reason": n // 2}
    items = [train[i] for i in range(len(train))]
    for it in items:
        record = next(r for r in train.records if r.name == it["name"])
        assert it["target"] == (record.label if it["task"] == "emotion" else record.reason)
    # Evaluation keeps the single task; the mixed batch gets per-item prompts and targets.
    assert set(mixed.datasets["test"].tasks) == {"reason"}
    emotion = next(it for it in items if it["task"] == "emotion")
    reason = next(it for it in items if it["task"] == "reason")
    batch = mixed.collator([emotion, reason])
    tok = mixed.collator.prompt_builder.tokenizer
    assert batch["tasks"] == ["emotion", "reason"]
    assert batch["target_ids"][0] == encode_answer(tok, emotion["target"])
    assert batch["target_ids"][1] == encode_answer(tok, reason["target"])
    describe = tok.convert_tokens_to_ids("describe")
    assert (batch["input_ids"] == describe).any(dim=1).tolist() == [False, True]
    # Same modality layout for both prompts: the feature tokens are where the ids say.
    for m in (1, 2):
        assert (
            (batch["modality_ids"] == m).sum(dim=1) == (batch["modality_ids"][0] == m).sum()
        ).all()
    assert torch.isfinite(_module(mixed).model.lm_loss(batch))
    # The reason half is a fixed, seeded subset; another seed picks another one.
    again = EMERDataModule(str(tmp_path), tasks={"emotion": 1.0, "reason": 0.5}, **kwargs)
    again.setup()
    other = EMERDataModule(
        str(tmp_path), tasks={"emotion": 1.0, "reason": 0.5}, shuffle_seed=1, **kwargs
    )
    other.setup()

    def reasoned(d):
        return {
            r.name
            for r, t in zip(d.datasets["train"].records, d.datasets["train"].tasks, strict=True)
            if t == "reason"
        }

    assert reasoned(again) == reasoned(mixed) != reasoned(other)
    with pytest.raises(ValueError, match="tasks"):
        EMERDataModule(str(tmp_path), tasks={"summary": 1.0}, **kwargs)


def test_emer_v2_is_unlabelled_and_cannot_train_on_labels(tmp_path):
    rows = "".join(f"v2_{i},中文,the person seems calm {i}\n" for i in range(6))
    (tmp_path / "emer-v2.csv").write_text("name,chinese,english\n" + rows, encoding="utf-8")
    (tmp_path / "subs.csv").write_text(
        "name,chinese,english\n" + "".join(f"v2_{i},x,hello {i}\n" for i in range(6))
    )
    write_features(tmp_path, [f"v2_{i}" for i in range(6)])
    tokenizer_for(tmp_path, "the person seems calm hello", *map(str, range(6)))
    kwargs = dict(version="v2", annotations="emer-v2.csv", subtitles="subs.csv", streams=STREAMS)
    data = EMERDataModule(str(tmp_path), **kwargs)
    data.setup()
    item = data.datasets["test"][0]
    assert item["label"] == -1 and item["target"].startswith("the person seems calm")
    assert item["subtitle"].startswith("hello")
    with pytest.raises(FormatError, match="'label'.*target"):
        EMERDataModule(str(tmp_path), task="emotion", train_fraction=0.5, **kwargs).setup()
    skipping = EMERDataModule(
        str(tmp_path), task="emotion", train_fraction=0.5, on_error="skip", **kwargs
    )
    skipping.setup()
    assert len(skipping.skipped) == 3 and {r["field"] for r in skipping.skipped} == {"label"}


# ------------------------------------------------------------------------------ bad input


def write_store(root: Path, train: list[str], test: list[str]) -> None:
    """Label CSVs, subtitles, tokenizer and features for a features-only MER2023 root."""
    for split, names in (("train", train), ("test", test)):
        body = "".join(f"{n},{MER2023.labels[i % 6]},0\n" for i, n in enumerate(names))
        (root / f"{split}-label.csv").write_text("name,discrete,valence\n" + body)
    everyone = sorted(set(train + test))
    (root / "transcription.csv").write_text(
        "name,chinese,english\n" + "".join(f"{n},x,hello\n" for n in everyone)
    )
    write_features(root, everyone)
    tokenizer_for(root, "hello")


def _break(root: Path, case: str) -> tuple[str, str, str, str]:
    """Damage sample ``train_01`` (or the files) as ``case``; returns (name, file, field, words)."""
    name = "train_01"
    face = root / "mae_340_UTT" / f"{name}.npy"
    if case == "nan":
        np.save(face, np.full(32, np.nan, np.float32))
        return name, str(face), "feature 'face'", "NaN"
    if case == "shape":
        np.save(face, np.zeros(16, np.float32))
        return name, str(face), "feature 'face'", "shape (16,)"
    if case == "missing_file":
        face.unlink()
        return name, str(face), "feature 'face'", "file not found"
    labels = root / "train-label.csv"
    text = labels.read_text()
    if case == "unknown_label":
        labels.write_text(text.replace(f"{name},angry", f"{name},bored"))
        return name, str(labels), "discrete", "'bored' is not in the mer2023 label space"
    if case == "duplicate_in_file":
        labels.write_text(text + f"{name},sad,0\n")
        return name, str(labels), "name", "duplicate name"
    assert case == "duplicate_across_files"
    (root / "test-label.csv").write_text((root / "test-label.csv").read_text() + f"{name},sad,0\n")
    return name, str(root / "test-label.csv"), "name", f"also in {labels}"


@pytest.mark.parametrize(
    "case",
    [
        "nan",
        "shape",
        "missing_file",
        "unknown_label",
        "duplicate_in_file",
        "duplicate_across_files",
    ],
)
def test_bad_input_raises_naming_file_and_field_or_is_skipped_and_listed(tmp_path, case):
    train, test = [f"train_{i:02d}" for i in range(6)], ["test_00", "test_01"]
    write_store(tmp_path, train, test)
    name, file, field, words = _break(tmp_path, case)
    kwargs = dict(
        splits={"train": ["train-label.csv"], "test": ["test-label.csv"]},
        val_fraction=0.0,
        streams=STREAMS,
    )
    with pytest.raises(ValueError) as info:
        MER2023DataModule(str(tmp_path), **kwargs).setup()
    message = str(info.value)
    assert file in message and field in message and words in message

    data = MER2023DataModule(str(tmp_path), on_error="skip", **kwargs)
    data.setup()
    (row,) = data.skipped
    assert row["name"] == name and row["field"] == field and file in row["file"]
    assert words in row["reason"]
    kept = {r.name for split in data.datasets.values() for r in split.records}
    if case == "duplicate_in_file":  # the first row stays, the repeated one is dropped
        assert kept == set(train + test)
    elif case == "duplicate_across_files":  # the first split keeps it
        assert kept == set(train + test)
        assert name not in {r.name for r in data.datasets["test"].records}
    else:
        assert kept == set(train + test) - {name}


# ---------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("name", "cls"),
    [("mer2023", "MER2023DataModule"), ("dfew", "DFEWDataModule"), ("emer", "EMERDataModule")],
)
def test_data_configs_compose_with_the_default_config(workdir, capsys, name, cls):
    import yaml

    from src.cli import main
    from tests.conftest import REPO

    data = REPO / "conf" / "data" / f"{name}.yaml"
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                str(REPO / "conf/default.yaml"),
                "--data",
                str(data),
                "--print_config",
            ]
        )
    config = yaml.safe_load(capsys.readouterr().out)["data"]
    assert config["class_path"].endswith(cls)
    assert config["init_args"]["root"].startswith("/data/")  # a placeholder the user sets
    assert "synthetic" not in config["init_args"]
