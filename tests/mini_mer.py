"""Builders of tiny test data sets in the real on-disk layouts (clips written with PyAV, label and
subtitle CSVs, a word tokenizer, tiny encoders saved as local checkpoint directories)."""

from pathlib import Path

import av
import numpy as np
import torch

from src.core.label_space import MER2023
from src.core.streams import StreamSpec
from src.data.camer.synthetic import PROMPT_WORDS
from src.data.components.tokenizer import build_word_tokenizer
from src.models.encoders import AudioEncoder, VisualEncoder
from tests.data.components.test_media import write_clip
from tests.models.test_encoders import SSL_LAYER, VISION

#: Streams of the tiny data sets: two visual encoders and a layer-norm HuBERT, 32-d each.
STREAMS = [
    StreamSpec("face", "mae_340_UTT", "visual", 32, 2),
    StreamSpec("video", "maeV_399_UTT", "visual", 32, 2),
    StreamSpec("audio", "HL-UTT", "audio", 32, 1),
]
EXTRA_WORDS = "describe emotional cues and audio infer of".split()
BROKEN = ("bad_truncated", "bad_noaudio", "bad_emptyaudio", "bad_junk", "bad_missing")


def write_mer2023(
    root: Path, n_train: int = 8, n_test: int = 3, broken: bool = False
) -> dict[str, list[str]]:
    """A MER2023-style folder: ``video/<name>.mp4``, ``train-label.csv``, ``test-label.csv``,
    ``transcription.csv`` (``name,chinese,english``) and ``tokenizer/``.

    Clips differ in length (frames and audio), so batches need padding. With ``broken``, the
    train list also names clips that are truncated, lack an audio stream, have an empty audio
    track, are not media at all, or do not exist (:data:`BROKEN`). Returns names per split.
    """
    video = root / "video"
    video.mkdir(parents=True, exist_ok=True)
    labels = MER2023.labels
    splits = {
        "train": [f"train_{i:02d}" for i in range(n_train)],
        "test": [f"test_{i:02d}" for i in range(n_test)],
    }
    for i, name in enumerate(splits["train"] + splits["test"]):
        write_clip(video / f"{name}.mp4", n_frames=5 + i % 4, audio_seconds=0.25 + 0.05 * (i % 5))
    if broken:
        whole = write_clip(root / "whole.mp4", n_frames=30, faststart=True).read_bytes()
        (root / "whole.mp4").unlink()
        (video / "bad_truncated.mp4").write_bytes(whole[: len(whole) // 2])
        write_clip(video / "bad_noaudio.mp4", audio_seconds=None)
        write_empty_audio_track(video / "bad_emptyaudio.mkv")
        junk = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        (video / "bad_junk.mp4").write_bytes(junk)
        splits["train"] += list(BROKEN)
    for split, names in splits.items():
        rows = "".join(f"{n},{labels[i % len(labels)]},{i % 3 - 1}\n" for i, n in enumerate(names))
        (root / f"{split}-label.csv").write_text("name,discrete,valence\n" + rows)
    everyone = splits["train"] + splits["test"]
    subtitles = "".join(f"{n},x,i said hello to {n}\n" for n in everyone)
    (root / "transcription.csv").write_text("name,chinese,english\n" + subtitles)
    build_word_tokenizer(
        [*PROMPT_WORDS, *EXTRA_WORDS, *labels, "i", "said", "hello", "to", *everyone],
        root / "tokenizer",
    )
    return splits


def write_empty_audio_track(path: Path) -> Path:
    """A Matroska clip with three frames and an audio track that holds no samples."""
    with av.open(str(path), "w") as container:
        container.add_stream("pcm_s16le", rate=16_000)
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 32, 24, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    return path


#: The tiny HuBERT with the real one's 320-sample hop (50 frames/s): cheap on long real clips.
SSL_HOP320 = dict(SSL_LAYER, conv_dim=(16, 16, 16), conv_stride=(5, 8, 8), conv_kernel=(10, 8, 8))


def save_encoders(folder: Path, seed: int = 0, audio_config: dict | None = None) -> dict[str, Path]:
    """Tiny random ViT, CLIP vision and layer-norm HuBERT saved as local checkpoint folders.

    Layer-norm HuBERT (as HuBERT-large) makes a padded clip's feature equal the clip's own, so
    batched extraction and online encoding agree. ``audio_config`` replaces its config.
    """
    torch.manual_seed(seed)
    dirs = {"vit": folder / "vit", "clip": folder / "clip", "hubert": folder / "hubert"}
    VisualEncoder("vit", config=VISION).model.save_pretrained(dirs["vit"])
    VisualEncoder("clip", config=VISION).model.save_pretrained(dirs["clip"])
    hubert = AudioEncoder("hubert", config=audio_config or SSL_LAYER)
    hubert.model.save_pretrained(dirs["hubert"])
    return dirs


def load_encoders(dirs: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """The encoders of :data:`STREAMS` from :func:`save_encoders`'s folders."""
    return {
        "face": VisualEncoder("vit", pretrained=str(dirs["vit"])),
        "video": VisualEncoder("clip", pretrained=str(dirs["clip"])),
        "audio": AudioEncoder("hubert", pretrained=str(dirs["hubert"])),
    }


def write_features(
    root: Path, names: list[str], streams: list[StreamSpec] = STREAMS, seed: int = 0
) -> None:
    """Random float32 ``(dim,)`` vectors in the Emotion-LLaMA layout for ``names``."""
    rng = np.random.default_rng(seed)
    for stream in streams:
        folder = root / stream.feature_dir
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            np.save(folder / f"{name}.npy", rng.standard_normal(stream.dim).astype(np.float32))
