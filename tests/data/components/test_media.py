"""Media decoding: the six real MER2023 clips, clips written here with PyAV, and broken files."""

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from src.data.components.media import (
    ClipDecoder,
    FrameTransform,
    MediaDecodeError,
    decode_audio,
    decode_video,
    find_clip,
    pad_audio,
    probe,
    sample_indices,
)

# Frame counts as stored in the mp4 index; the tests also decode the last frame.
REAL_CLIPS = {
    "sample_00000167": 60,
    "sample_00000338": 114,
    "sample_00000669": 186,
    "sample_00000694": 339,
    "sample_00000727": 257,
    "sample_00001073": 92,
}


@pytest.fixture(scope="module")
def video_dir(realdata: Path) -> Path:
    """The real clips (``realdata`` from conftest.py skips when $MOSEAR_REALDATA is unset)."""
    folder = realdata / "mer2023-mini" / "video"
    missing = [n for n in REAL_CLIPS if not (folder / f"{n}.mp4").is_file()]
    if missing:
        pytest.fail(f"MOSEAR_REALDATA is set but clips are missing: {missing}")
    return folder


def write_clip(
    path: Path,
    *,
    n_frames: int = 10,
    fps: int = 10,
    size: tuple[int, int] = (32, 24),
    audio_seconds: float | None = 1.0,
    rate: int = 22050,
    faststart: bool = False,
) -> Path:
    """An mpeg4 + AAC clip whose frame i has grey level 20 * i and whose audio is a 0.5 sine."""
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = None
        if audio_seconds is not None:
            audio = container.add_stream("aac", rate=rate, layout="stereo")
        for i in range(n_frames):
            grey = np.full((size[1], size[0], 3), 20 * i % 256, np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(grey, format="rgb24")):
                container.mux(packet)
        container.mux(video.encode(None))
        if audio is not None:
            n = int(audio_seconds * rate)
            signal = (0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)
            for start in range(0, n, 1024):
                chunk = np.zeros(1024, np.float32)
                chunk[: len(signal[start : start + 1024])] = signal[start : start + 1024]
                frame = av.AudioFrame.from_ndarray(
                    np.stack([chunk, chunk]), format="fltp", layout="stereo"
                )
                frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
                container.mux(audio.encode(frame))
            container.mux(audio.encode(None))
    return path


# ----------------------------------------------------------------------------- real clips


@pytest.mark.parametrize("name", list(REAL_CLIPS))
def test_real_clip_probe_frames_and_audio(video_dir, name):
    path = video_dir / f"{name}.mp4"
    info = probe(path)
    assert info.n_frames == REAL_CLIPS[name]
    assert info.fps in (24.0, 25.0)
    assert info.duration == pytest.approx(info.n_frames / info.fps, abs=0.05)
    assert (info.has_audio, info.sample_rate, info.channels) == (True, 44100, 2)
    frames = decode_video(path, strategy="uniform", num_frames=8)
    assert frames.shape == (8, 3, info.height, info.width) and frames.dtype == torch.uint8
    assert frames.float().std() > 1  # real pictures, not blank frames
    audio = decode_audio(path)
    assert audio.ndim == 1 and audio.dtype == torch.float32
    assert audio.shape[0] / 16_000 == pytest.approx(info.duration, abs=0.1)
    assert 0.01 < audio.abs().max() <= 1.0


def test_real_clip_last_frame_decodes_and_one_past_is_refused(video_dir):
    path = video_dir / "sample_00000167.mp4"
    n = REAL_CLIPS["sample_00000167"]
    last = decode_video(path, strategy="peak", peak_index=n - 1)
    assert last.shape[0] == 1
    with pytest.raises(MediaDecodeError) as info:
        decode_video(path, strategy="peak", peak_index=n)
    assert info.value.field == "peak_index" and str(path) in str(info.value)


def test_real_clip_through_clip_decoder(video_dir):
    decoder = ClipDecoder(strategy="middle", size=112, mean=(0.5,) * 3, std=(0.5,) * 3)
    out = decoder(video_dir / "sample_00001073.mp4")
    assert out["frames"].shape == (1, 3, 112, 112) and out["frames"].dtype == torch.float32
    assert -1.0 <= float(out["frames"].min()) and float(out["frames"].max()) <= 1.0
    assert out["audio"].shape[0] / 16_000 == pytest.approx(3.68, abs=0.1)


# ----------------------------------------------------------------------------- crafted clips


def test_uniform_sampling_picks_segment_centres(tmp_path):
    path = write_clip(tmp_path / "c.mp4", n_frames=10)
    frames = decode_video(path, strategy="uniform", num_frames=5)
    grey = frames.float().mean(dim=(1, 2, 3))
    assert grey.tolist() == pytest.approx([20, 60, 100, 140, 180], abs=6)  # frames 1,3,5,7,9
    assert decode_video(path, strategy="first").float().mean() == pytest.approx(0, abs=6)
    assert decode_video(path, strategy="middle").float().mean() == pytest.approx(100, abs=6)
    assert decode_video(path, strategy="peak", peak_index=7).float().mean() == pytest.approx(
        140, abs=6
    )


def test_sample_indices_rules():
    assert sample_indices(10, "uniform", 5) == [1, 3, 5, 7, 9]
    assert sample_indices(3, "uniform", 6) == [0, 0, 1, 1, 2, 2]  # short clip: repeats
    assert sample_indices(9, "middle") == [4] and sample_indices(9, "first") == [0]
    with pytest.raises(ValueError, match="peak_index"):
        sample_indices(9, "peak")
    with pytest.raises(ValueError, match="strategy"):
        sample_indices(9, "random")


def test_container_audio_is_mono_16k(tmp_path):
    path = write_clip(tmp_path / "c.mp4", audio_seconds=1.0, rate=22050)
    audio = decode_audio(path)
    # AAC adds encoder priming/padding of up to a few frames of 1024 samples.
    assert 16_000 <= audio.shape[0] <= 16_000 + 3 * 1024
    assert float(audio.abs().max()) == pytest.approx(0.5, abs=0.05)  # mean of two equal sides


def test_file_audio_is_mixed_to_mono_and_resampled(tmp_path):
    t = np.arange(44_100) / 44_100
    left = 0.8 * np.sin(2 * np.pi * 300 * t)
    stereo = np.stack([left, np.zeros_like(left)], axis=1).astype(np.float32)
    sf.write(tmp_path / "s.flac", stereo, 44_100)
    sf.write(tmp_path / "m.wav", left.astype(np.float32), 16_000)
    audio = decode_audio(tmp_path / "s.flac")
    assert abs(audio.shape[0] - 16_000) <= 2
    assert float(audio[100:-100].abs().max()) == pytest.approx(0.4, abs=0.01)  # (L + R) / 2
    same_rate = decode_audio(tmp_path / "m.wav")  # 16 kHz in: no resampling
    assert torch.allclose(same_rate, torch.from_numpy(left.astype(np.float32)), atol=1e-4)


def test_frame_transform_shapes_and_normalisation():
    frames = torch.full((4, 3, 40, 60), 255, dtype=torch.uint8)
    out = FrameTransform(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(frames)
    assert out.shape == (4, 3, 16, 16)
    assert torch.allclose(out, torch.full_like(out, 2.0))  # (1 - 0.5) / 0.25
    squashed = FrameTransform(16, crop=False)(frames[:1])
    assert squashed.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        FrameTransform(16)(frames.float())


def test_find_clip_tries_mp4_then_avi(tmp_path):
    (tmp_path / "x.avi").write_bytes(b"0")
    assert find_clip(tmp_path, "x").name == "x.avi"
    with pytest.raises(MediaDecodeError, match="tried y.mp4, y.avi"):
        find_clip(tmp_path, "y")


# ----------------------------------------------------------------------------- broken files


def expect_error(call, path: Path, field: str, words: str) -> None:
    with pytest.raises(MediaDecodeError) as info:
        call()
    err = info.value
    assert (err.path, err.field) == (str(path), field)
    assert words in err.reason and str(path) in str(err)


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "missing.mp4"
    expect_error(lambda: decode_video(missing), missing, "path", "not found")
    expect_error(lambda: decode_audio(tmp_path / "gone.wav"), tmp_path / "gone.wav", "path", "")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    expect_error(lambda: probe(empty), empty, "container", "empty")


def test_corrupt_and_truncated_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    expect_error(lambda: decode_video(junk), junk, "container", "cannot open")
    # Index at the end of the file (the default): a truncated file cannot even be opened.
    whole = write_clip(tmp_path / "whole.mp4").read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])
    expect_error(lambda: decode_video(cut), cut, "container", "cannot open")
    # Index first (faststart): the file opens, the frames run out.
    fast = write_clip(tmp_path / "fast.mp4", n_frames=30, faststart=True).read_bytes()
    cut_fast = tmp_path / "cut_fast.mp4"
    cut_fast.write_bytes(fast[: len(fast) // 2])
    expect_error(lambda: decode_video(cut_fast), cut_fast, "video", "truncated")


def test_no_audio_stream_and_zero_length_audio(tmp_path):
    silent = write_clip(tmp_path / "silent.mp4", audio_seconds=None)
    expect_error(lambda: decode_audio(silent), silent, "audio", "no audio stream")
    assert decode_video(silent, num_frames=2).shape[0] == 2  # the video itself is fine
    empty_wav = tmp_path / "empty.wav"
    sf.write(empty_wav, np.zeros((0, 2), np.float32), 16_000)
    expect_error(lambda: decode_audio(empty_wav), empty_wav, "audio", "zero-length")
    # A Matroska file keeps an audio track that holds no samples.
    mkv = tmp_path / "empty_track.mkv"
    with av.open(str(mkv), "w") as container:
        container.add_stream("pcm_s16le", rate=16_000)
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 32, 24, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    assert probe(mkv).has_audio and probe(mkv).n_frames == 3
    expect_error(lambda: decode_audio(mkv), mkv, "audio", "zero-length")


def test_corrupt_wav_and_audio_only_file(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunk")
    expect_error(lambda: decode_audio(bad), bad, "audio", "cannot read")
    wav = tmp_path / "tone.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16_000)
    expect_error(lambda: decode_video(wav), wav, "video", "no video stream")


def test_pad_audio_and_decoder_with_an_encoder_transform():
    batch, lengths = pad_audio([torch.ones(3), torch.ones(5)])
    assert batch.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]] and lengths.tolist() == [3, 5]
    transform = FrameTransform(8, mean=(0.1, 0.2, 0.3), std=(1, 1, 1))
    assert ClipDecoder(transform=transform).transform is transform
