"""Time per batch: online encoders (decode + encode) vs reading the feature store.

Both paths feed the same model input: ``(B, dim)`` features per stream. Online = decode each clip
(PyAV frames + audio, as ``source: media`` does in a DataLoader worker), collate, run the frozen
encoders; store = load the ``.npy`` files ``extract`` wrote from the same clips and stack them.
Encoders are random-init HF models built from config (nothing is downloaded): ``tiny`` is the
test size, ``base`` the ViT-B / HuBERT-base shape (12 layers, 768 wide).

    python experiments/bench_feature_store.py                      # synthetic clips
    MOSEAR_REALDATA=../shared/realdata python experiments/bench_feature_store.py --real
"""

import argparse
import os
import statistics
import tempfile
import time
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

from src.commands.extract import extract_features
from src.core.streams import StreamSpec
from src.data.components.feature_store import FeatureStore
from src.data.components.media import pad_audio
from src.data.components.media_source import MediaLoader, MediaSpec
from src.models.encoders import AudioEncoder, VisualEncoder

SIZES = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "base": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
    ),
}
# HuBERT's feature extractor with the real 320-sample hop (50 frames per second).
CONV = dict(
    conv_dim=(64, 64, 64),
    conv_stride=(5, 8, 8),
    conv_kernel=(10, 8, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
)


def write_clip(path: Path, seconds: float, fps: int = 25, size=(480, 270), rate=44100) -> None:
    """An H.264 + AAC stereo clip of moving noise (closer to real video than flat frames)."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = container.add_stream("aac", rate=rate, layout="stereo")
        base = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        for i in range(int(seconds * fps)):
            frame = np.roll(base, 4 * i, axis=1)
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        container.mux(video.encode(None))
        n = int(seconds * rate)
        signal = (0.3 * rng.standard_normal((2, n))).astype(np.float32)
        for start in range(0, n, 1024):
            chunk = np.zeros((2, 1024), np.float32)
            part = signal[:, start : start + 1024]
            chunk[:, : part.shape[1]] = part
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            container.mux(audio.encode(frame))
        container.mux(audio.encode(None))


def build_encoders(size: str, num_frames: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    width = SIZES[size]
    image = dict(width, image_size=224, patch_size=16)
    return {
        "face": VisualEncoder("vit", config=image),
        "video": VisualEncoder("videomae", config=dict(image, num_frames=num_frames)),
        "audio": AudioEncoder("hubert", config=dict(width, **CONV)),
    }


def online_batch(loader: MediaLoader, names: list[str], encoders, device: str) -> tuple[float, ...]:
    """Seconds to decode + collate, and to encode, one batch."""
    start = time.perf_counter()
    items = [loader.load(n) for n in names]
    frames = torch.stack([it["frames"] for it in items]).to(device)
    audio, lengths = pad_audio([it["audio"] for it in items])
    decoded = time.perf_counter()
    with torch.inference_mode():
        for name, encoder in encoders.items():
            if name == "audio":
                encoder(audio.to(device), lengths.to(device))
            else:
                encoder(frames)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return decoded - start, time.perf_counter() - decoded


def store_batch(store: FeatureStore, names: list[str]) -> float:
    start = time.perf_counter()
    loaded = [store.load(n) for n in names]
    _ = {k: torch.from_numpy(np.stack([f[k] for f in loaded])) for k in loaded[0]}
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", action="store_true", help="the six real MER2023 clips")
    parser.add_argument("--clips", type=int, default=8, help="synthetic clips")
    parser.add_argument("--seconds", type=float, default=4.0, help="synthetic clip length")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny")
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_store_"))
    if args.real:
        video_dir = Path(os.environ["MOSEAR_REALDATA"]) / "mer2023-mini" / "video"
        names = sorted(p.stem for p in video_dir.glob("*.mp4"))
    else:
        video_dir = work / "video"
        video_dir.mkdir()
        names = [f"clip_{i:03d}" for i in range(args.clips)]
        for name in names:
            write_clip(video_dir / f"{name}.mp4", args.seconds)
    spec = MediaSpec(video_dir=str(video_dir), num_frames=args.num_frames, frame_size=224)
    loader = MediaLoader(work, spec, video=True, audio=True)
    encoders = {k: e.to(args.device) for k, e in build_encoders(args.size, args.num_frames).items()}
    dim = SIZES[args.size]["hidden_size"]
    streams = [
        StreamSpec("face", "mae_340_UTT", "visual", dim),
        StreamSpec("video", "maeV_399_UTT", "visual", dim),
        StreamSpec("audio", "HL-UTT", "audio", dim),
    ]
    extract_features(
        names, loader, encoders, streams, work, batch_size=args.batch_size, progress=False
    )
    store = FeatureStore(work, streams)
    batches = [names[i : i + args.batch_size] for i in range(0, len(names), args.batch_size)]
    decode, encode, stored = [], [], []
    for _ in range(args.repeats):
        for batch in batches:
            d, e = online_batch(loader, batch, encoders, args.device)
            decode.append(d)
            encode.append(e)
            stored.append(store_batch(store, batch))
    d, e, s = (1000 * statistics.median(x) for x in (decode, encode, stored))
    source = f"{len(names)} " + ("real MER2023 clips" if args.real else f"{args.seconds} s clips")
    print(
        f"{source}, batch {args.batch_size}, {args.size} encoders on {args.device}, "
        f"K={args.num_frames} frames at 224 px, torch threads {torch.get_num_threads()}"
    )
    print(f"{'path':<32}{'ms / batch':>12}")
    print(f"{'online: decode + collate':<32}{d:>12.1f}")
    print(f"{'online: encoders':<32}{e:>12.1f}")
    print(f"{'online: total':<32}{d + e:>12.1f}")
    print(f"{'feature store: load + stack':<32}{s:>12.2f}")
    print(f"speed-up of the store over online encoders: {(d + e) / s:.0f}x")


if __name__ == "__main__":
    main()
