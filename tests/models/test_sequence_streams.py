"""Sequence streams: one shared projector row -> token, the stored (tokens, dim) layout, encoders
that write sequences, and the data module's Bayes bounds and val carving for real manifests."""

import numpy as np
import pytest
import torch

from src.callbacks.results_table import format_results_table
from src.core.records import SampleRecord
from src.core.streams import StreamSpec
from src.data.camer.datamodule import CAMERDataModule
from src.data.camer.manifest import write_manifest
from src.data.components.feature_store import FeatureFileError, FeatureStore
from src.data.components.tokenizer import build_word_tokenizer
from src.metrics.closed_set import EmotionMetrics
from src.models.encoders import _pool_steps
from src.models.projector import FeatureProjector
from tests.models.test_encoders import audio, visual

SEQ = StreamSpec("face", "f", "visual", 6, 5, sequence=True)


@pytest.mark.parametrize("mlp_hidden", [None, 7])
def test_sequence_projector_maps_each_row_to_one_token(mlp_hidden):
    torch.manual_seed(0)
    projector = FeatureProjector(6, 4, 5, mlp_hidden, sequence=True)
    x = torch.randn(3, 5, 6)
    out = projector(x)
    assert out.shape == (3, 5, 4)
    for i in range(5):  # row by row: the same map on each row, nothing mixed across rows
        assert torch.allclose(out[:, i], projector.net(x[:, i]), atol=1e-6)
    changed = x.clone()
    changed[:, 2] += 1.0
    moved = (projector(changed) - out).abs().sum(dim=(0, 2))
    assert moved[2] > 0 and torch.all(moved[[0, 1, 3, 4]] == 0)
    with pytest.raises(ValueError, match=r"\(batch, 5, dim\)"):
        projector(torch.randn(3, 4, 6))


def test_pooled_projector_is_unchanged():
    torch.manual_seed(0)
    projector = FeatureProjector(6, 4, 3)
    x = torch.randn(2, 6)
    assert torch.allclose(projector(x), projector.net(x).view(2, 3, 4))


def test_feature_store_reads_sequences_and_names_the_expected_shape(tmp_path):
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "a.npy", np.ones((5, 6), np.float32))
    np.save(tmp_path / "f" / "b.npy", np.ones(6, np.float32))
    store = FeatureStore(tmp_path, [SEQ])
    assert store.load("a")["face"].shape == (5, 6)
    with pytest.raises(FeatureFileError, match=r"b.npy: feature 'face': shape \(6,\) .* \(5, 6\)"):
        store.load("b")


def test_pool_steps_averages_valid_segments():
    hidden = torch.arange(2 * 6, dtype=torch.float32).view(1, 6, 2).repeat(2, 1, 1)
    out = _pool_steps(hidden, torch.tensor([6, 4]), 3)
    # Row 0: 6 valid steps in pairs; row 1: 4 valid steps -> [0,2), [1,3), [2,4).
    assert torch.allclose(out[0, :, 0], torch.tensor([1.0, 5.0, 9.0]))
    assert torch.allclose(out[1, :, 0], torch.tensor([1.0, 3.0, 5.0]))
    assert torch.equal(_pool_steps(hidden, torch.tensor([6, 6]), 6), hidden)


@pytest.mark.parametrize("kind", ["vit", "clip", "videomae"])
def test_visual_encoder_writes_patch_token_sequences(kind):
    frames = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
    tokens = visual(kind, tokens=8)(frames)
    assert tokens.shape == (2, 8, 32)
    if kind != "videomae":  # 16 patches averaged in pairs, frames averaged
        encoder = visual(kind)
        hidden = encoder.model(pixel_values=encoder.transform(frames).flatten(0, 1))
        patches = hidden.last_hidden_state[:, 1:].view(2, 4, 16, 32).mean(1)
        assert torch.allclose(tokens, patches.view(2, 8, 2, 32).mean(2), atol=1e-5)


def test_audio_encoder_writes_frame_sequences():
    encoder = audio("hubert", tokens=4)
    out = encoder(torch.randn(2, 12_000), torch.tensor([12_000, 6_000]))
    assert out.shape == (2, 4, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="tokens must be a positive"):
        audio("hubert", tokens=0)


def test_results_table_prints_bounds_or_says_there_are_none():
    metrics = EmotionMetrics(num_classes=2, prefix="test/")
    metrics.set_bayes(
        {
            "acc": 0.75,
            "video_aligned/acc": 0.5,
            "audio_aligned/acc": 1.0,
            "modality_gap": 0.5,
            "counts": {"video_aligned": 2, "audio_aligned": 2},
        }
    )
    # video_aligned: 0 of 2 right, audio_aligned: 2 of 2: gap 1.0, Bayes gap 0.5.
    metrics.update(
        torch.tensor([1, 1, 0, 1]), torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])
    )
    out = {k: float(v) for k, v in metrics.compute().items()}
    assert out["test/excess_gap"] == pytest.approx(0.5)
    assert out["test/acc_shortfall"] == pytest.approx(0.25)
    assert out["test/bayes/video_aligned/acc"] == 0.5
    table = format_results_table(out)
    assert "Bayes %" in table and "excess_gap" in table and "50.00" in table
    assert "none for this data set" in format_results_table({"test/acc": 0.5})
    # Bounds of other samples (a limited split) are not reported.
    metrics.reset()
    metrics.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    with pytest.warns(UserWarning, match="bounds not reported"):
        assert "test/excess_gap" not in metrics.compute()


def test_real_manifest_without_val_gets_one_mirroring_the_test_mix(tmp_path):
    labels = ["neutral", "angry", "happy"]
    records = [
        SampleRecord(name=f"tr{i}", split="train", label=labels[i % 3], subset="consistent")
        for i in range(9)
    ]
    plan = {"video_aligned": 20, "audio_aligned": 10, "consistent": 30}
    for subset, n in plan.items():
        for i in range(n):
            y, o = labels[i % 3], labels[(i + 1) % 3]
            video, audio_ = (y, o) if subset == "video_aligned" else (o, y)
            if subset == "consistent":
                video = audio_ = y
            records.append(
                SampleRecord(
                    name=f"{subset}{i}",
                    split="test",
                    label=y,
                    subset=subset,
                    video_label=video,
                    audio_label=audio_,
                )
            )
    write_manifest(tmp_path / "manifest.csv", records)
    (tmp_path / "transcription.csv").write_text(
        "name,english\n" + "".join(f"{r.name},hello\n" for r in records)
    )
    build_word_tokenizer(["hello", *labels], tmp_path / "tokenizer")
    data = CAMERDataModule(str(tmp_path), streams=[], label_space=labels, val_fraction=0.2)
    carved = data.load_records()
    val = [r for r in carved if r.split == "val"]
    assert {s: sum(r.subset == s for r in val) for s in plan} == {
        "video_aligned": 4,
        "audio_aligned": 2,
        "consistent": 6,
    }
    assert sum(r.split == "test" for r in carved) == 48
    assert all(r.split == "train" for r in carved if r.name.startswith("tr"))
    assert carved == CAMERDataModule(str(tmp_path), streams=[], label_space=labels).load_records()
    assert data.bayes_bounds("test") is None  # real data: no bounds
