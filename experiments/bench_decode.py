"""Decode throughput on the six real MER2023 clips, and the feature store's speed-up over decoding.

Usage::

    MOSEAR_REALDATA=/path/to/realdata python experiments/bench_decode.py [--repeats 5]
    python experiments/bench_decode.py /path/to/realdata/mer2023-mini/video

Reports clips/s for: video only (uniform K frames, resize + normalise), audio only (mono 16 kHz),
both (what an online-encoder data loader does per sample), and loading three Emotion-LLaMA
``(1024,)`` feature files per clip from a store written to a temporary folder. The store's speed-up
printed here is over decoding alone, a lower bound of its speed-up over online encoders (which
also run the encoders). Single process; pass ``--threads`` to pin torch's CPU threads.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from src.data.components.media import FrameTransform, decode_audio, decode_video

FEATURE_DIRS = ("mae_340_UTT", "maeV_399_UTT", "HL-UTT")


def clips_per_second(work: Callable[[Path], object], clips: list[Path], repeats: int) -> dict:
    """Best and median clips/s over ``repeats`` passes over all clips (after one warm-up pass)."""
    for clip in clips:
        work(clip)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for clip in clips:
            work(clip)
        rates.append(len(clips) / (time.perf_counter() - start))
    return {"median": statistics.median(rates), "best": max(rates), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("video_dir", nargs="?", default=None, help="folder of the real clips")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num_frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=str, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.video_dir is None:
        root = os.environ.get("MOSEAR_REALDATA")
        if not root:
            parser.error("give the clip folder or set MOSEAR_REALDATA")
        args.video_dir = str(Path(root) / "mer2023-mini" / "video")
    clips = sorted(Path(args.video_dir).glob("*.mp4"))
    if not clips:
        parser.error(f"no .mp4 clips in {args.video_dir}")
    if args.threads:
        torch.set_num_threads(args.threads)
    transform = FrameTransform(args.size)

    def video(path: Path) -> torch.Tensor:
        return transform(decode_video(path, strategy="uniform", num_frames=args.num_frames))

    def both(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        return video(path), decode_audio(path)

    results = {
        "video_uniform": clips_per_second(video, clips, args.repeats),
        "video_middle": clips_per_second(
            lambda p: transform(decode_video(p, strategy="middle")), clips, args.repeats
        ),
        "audio_16k": clips_per_second(decode_audio, clips, args.repeats),
        "video_and_audio": clips_per_second(both, clips, args.repeats),
    }
    with tempfile.TemporaryDirectory() as store:
        rng = np.random.default_rng(0)
        for folder in FEATURE_DIRS:
            (Path(store) / folder).mkdir()
            for clip in clips:
                np.save(Path(store) / folder / f"{clip.stem}.npy", rng.random(1024, np.float32))

        def load(path: Path) -> list[np.ndarray]:
            return [np.load(Path(store) / f / f"{path.stem}.npy") for f in FEATURE_DIRS]

        results["feature_store_3x1024"] = clips_per_second(load, clips, args.repeats)
    speedup = results["feature_store_3x1024"]["median"] / results["video_and_audio"]["median"]
    meta = {
        "clips": len(clips),
        "num_frames": args.num_frames,
        "size": args.size,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    print(
        f"{len(clips)} clips, K={args.num_frames} frames at {args.size}px, "
        f"torch threads={meta['torch_threads']}, cpus={meta['cpu_count']}"
    )
    for name, r in results.items():
        print(
            f"  {name:22s} {r['median']:9.2f} clips/s (median of {r['repeats']}, "
            f"best {r['best']:.2f})"
        )
    print(
        f"  feature store vs decoding video+audio: {speedup:.0f}x (lower bound vs online encoders)"
    )
    if args.json:
        payload = {"meta": meta, "results": results, "store_speedup_over_decode": speedup}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
