"""``python -m src.cli extract``: run frozen encoders over a data set's clips and write the feature
store in the Emotion-LLaMA layout, ``<output>/<feature_dir>/<name>.npy`` (float32, ``(dim,)``
pooled, or ``(tokens, dim)`` for a sequence stream: patch tokens or audio frames, written when
the stream has ``sequence: true`` and its encoder ``tokens: N``).

Resumable: a sample whose files all exist is skipped, so an interrupted run continues where it
stopped; files are written atomically, so a killed run leaves no half-written ``.npy``. Each
feature folder records the encoder that wrote it (``encoder.json``: class, config, weight hash,
decoding settings); a run with another encoder is refused instead of mixing two encoders'
files. Clips are decoded in DataLoader workers and encoded in batches. With ``--on_error skip``
a clip that cannot be decoded (or an annotation row that cannot be read) is listed in the report
CSV instead of stopping the run.

    python -m src.cli extract --config conf/extract/mer2023.yaml
    python -m src.cli extract --clips clips/ --output store/ --config encoders.yaml
"""

import csv
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from jsonargparse import ArgumentParser
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from src.core.errors import STRICT_PARSER
from src.core.streams import StreamSpec
from src.data.base_datamodule import EmotionDataModule
from src.data.components.collate import collate_media
from src.data.components.feature_store import FeatureStore
from src.data.components.media import MediaDecodeError
from src.data.components.media_source import MediaLoader, MediaSpec, media_needs
from src.data.components.skip_report import SkipReport
from src.data.components.store_identity import (
    claim_feature_folder,
    encoder_identity,
    encoder_location,
)
from src.data.formats.rows import FormatError, utf8_errors
from src.io.atomic import atomic_open
from src.models.online_features import encode_media, stream_owners

REPORT_NAME = "extract_report.csv"


@dataclass
class ExtractResult:
    """What a run did.

    Args:
        written: Samples whose missing feature files were written.
        done: Samples whose files all existed already (skipped: the run resumes).
        report: Samples that failed (``on_error: skip``), with file, field and reason.
    """

    written: int = 0
    done: int = 0
    report: SkipReport = field(default_factory=SkipReport)

    def summary(self) -> str:
        return f"{self.written} written, {self.done} already done, {len(self.report)} failed" + (
            f"\n{self.report.summary()}" if len(self.report) else ""
        )


class _ClipDataset(Dataset):
    """Decodes clips in DataLoader workers; a failure is returned as data (exceptions with
    custom ``__init__`` arguments do not cross process boundaries intact)."""

    def __init__(self, names: list[str], loader: MediaLoader) -> None:
        self.names, self.loader = names, loader

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name = self.names[i]
        try:
            return {"name": name, **self.loader.load(name)}
        except MediaDecodeError as err:
            return {"name": name, "error": (err.path, err.field, err.reason)}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [it for it in items if "error" not in it]
    return {
        "names": [it["name"] for it in ok],
        "errors": [(it["name"], *it["error"]) for it in items if "error" in it],
        **collate_media(ok),  # as the training collator: the encoders see the same input
    }


def feature_path(output: str | Path, stream: StreamSpec, name: str) -> Path:
    """Where ``extract`` writes (and the feature store reads) one vector."""
    return FeatureStore(output, [stream]).path(stream, name)


def extract_features(
    names: Sequence[str],
    loader: MediaLoader,
    encoders: Mapping[str, nn.Module],
    streams: Sequence[StreamSpec],
    output: str | Path,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device: str = "cpu",
    on_error: Literal["raise", "skip"] = "raise",
    overwrite: bool = False,
    progress: bool = True,
    report: SkipReport | None = None,
) -> ExtractResult:
    """Encode every sample's clip with each stream's encoder and write the missing files.

    Args:
        names: Sample names (clip ``<name>.mp4`` etc. found by ``loader``).
        loader: Decodes a sample's frames and/or audio.
        encoders: Stream name -> frozen encoder (audio: ``(audio, lengths)``, visual: frames).
        streams: Stream specs (``feature_dir`` and ``dim``) of at least the encoders' streams.
        output: Root of the feature store.
        batch_size: Clips encoded together.
        num_workers: DataLoader workers decoding clips.
        device: Device of the encoders.
        on_error: ``raise`` a :class:`MediaDecodeError` naming the file and field, or ``skip``
            the sample and list it in the result's report.
        overwrite: Rewrite existing files instead of skipping them (same encoder only: a folder
            recording another encoder is refused either way).
        progress: Show a progress bar (counts and clips/s).
        report: Report to add failures to (e.g. one that already holds annotation skips).
    """
    by_name = {s.name: s for s in streams}
    owners = stream_owners(encoders)  # a multi-stream encoder (EVA-CLIP-g) fills several
    unknown = sorted(set(owners) - set(by_name))
    if unknown:
        raise ValueError(f"encoders for unknown streams {unknown}; streams are {sorted(by_name)}")
    targets = [by_name[n] for n in owners]
    for stream in targets:
        # Before any file is written: a store is never extended by another encoder.
        encoder = encoders[owners[stream.name]]
        where = encoder_location(encoder)
        identity = encoder_identity(encoder, stream, loader.spec)
        claim_feature_folder(Path(output) / stream.feature_dir, identity, where)
    result = ExtractResult(report=report if report is not None else SkipReport())
    seen: set[str] = set()
    todo: list[str] = []
    for name in names:
        if name in seen:
            reason = f"duplicate name {name!r} in the sample list"
            if on_error == "raise":
                raise ValueError(f"{output}: field 'name': {reason}")
            result.report.add(str(output), "name", reason, name)
            continue
        seen.add(name)
        if overwrite or any(not feature_path(output, s, name).is_file() for s in targets):
            todo.append(name)
        else:
            result.done += 1
    for encoder in encoders.values():
        encoder.to(device).eval()
    batches = DataLoader(
        _ClipDataset(todo, loader),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    bar = tqdm(total=len(todo), unit="clip", desc="extract", disable=not progress)
    bar.set_postfix(done=result.done, written=0, failed=0)
    with torch.inference_mode():
        for batch in batches:
            for name, path, field_name, reason in batch["errors"]:
                if on_error == "raise":
                    raise MediaDecodeError(path, field_name, reason)
                result.report.add(path, field_name, reason, name)
            if batch["names"]:
                _write_batch(batch, encoders, targets, output, device, overwrite, on_error, result)
            bar.update(len(batch["names"]) + len(batch["errors"]))
            bar.set_postfix(done=result.done, written=result.written, failed=len(result.report))
    bar.close()
    return result


def _write_batch(
    batch: dict[str, Any],
    encoders: Mapping[str, nn.Module],
    targets: Sequence[StreamSpec],
    output: str | Path,
    device: str,
    overwrite: bool,
    on_error: str,
    result: ExtractResult,
) -> None:
    names = batch["names"]
    # The model's online-encoder path: same inputs, same stream checks.
    on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    features = encode_media(encoders, targets, on_device)["features"]
    vectors = {s.name: features[s.name].float().cpu().numpy() for s in targets}
    for row, name in enumerate(names):
        bad = [s for s in targets if not np.isfinite(vectors[s.name][row]).all()]
        if bad:
            path, field_name = feature_path(output, bad[0], name), f"feature {bad[0].name!r}"
            reason = "the encoder output contains NaN or infinite values"
            if on_error == "raise":
                raise ValueError(f"{path}: {field_name}: {reason}")
            result.report.add(path, field_name, reason, name)
            continue
        for stream in targets:
            path = feature_path(output, stream, name)
            if overwrite or not path.is_file():
                with atomic_open(path, "wb") as handle:
                    np.save(handle, np.ascontiguousarray(vectors[stream.name][row]))
        result.written += 1


def read_names(path: str | Path) -> list[str]:
    """Sample names from a text file (one per line) or a CSV with a ``name`` column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"names file not found: {path}")
    if path.suffix.lower() == ".csv":
        with utf8_errors(path) as track, path.open(newline="", encoding="utf-8-sig") as handle:
            reader = track(csv.DictReader(handle))
            if "name" not in (reader.fieldnames or []):
                raise FormatError(path, "name", f"no 'name' column in {reader.fieldnames}", line=1)
            return [row["name"].strip() for row in reader if (row["name"] or "").strip()]
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(**STRICT_PARSER, prog="python -m src.cli extract", description=__doc__)
    parser.add_argument("--config", action="config")
    # A subclass group (as LightningCLI's `data`) also accepts the path of a data config file.
    parser.add_subclass_arguments(
        EmotionDataModule,
        "data",
        required=False,
        help="a data module config: its samples (every split), root, streams and media settings",
    )
    parser.add_argument(
        "--clips", type=str | None, default=None, help="instead of --data: a folder of clips"
    )
    parser.add_argument(
        "--names",
        type=str | None,
        default=None,
        help="with --clips: a text file of names (or a CSV with a name column); default: all",
    )
    parser.add_argument(
        "--media",
        type=MediaSpec,
        default=MediaSpec(),
        help="with --clips: decoding settings (video_dir is --clips; audio_dir is under it)",
    )
    parser.add_argument(
        "--streams",
        type=list[StreamSpec] | None,
        default=None,
        help="with --clips: stream specs (feature_dir, dim) for the encoders' streams",
    )
    parser.add_argument(
        "--encoders",
        type=dict[str, L.LightningModule],
        required=True,
        help="stream name -> encoder (src.models.encoders.AudioEncoder / VisualEncoder; "
        "src.models.eva_clip_encoder.EVACLIPGEncoder fills two streams, under either name)",
    )
    parser.add_argument("--output", type=str | None, default=None, help="store root")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--device", type=str, default="cpu")
    parser.add_argument("--on_error", type=Literal["raise", "skip"], default="raise")
    parser.add_argument(
        "--report", type=str | None, default=None, help=f"default: <output>/{REPORT_NAME}"
    )
    parser.add_argument("--overwrite", type=bool, default=False)
    parser.add_argument("--progress", type=bool, default=True)
    parser.add_argument("--seed", type=int, default=0, help="seed before building the encoders")
    return parser


def _clip_names(folder: Path, spec: MediaSpec) -> list[str]:
    suffixes = {s.lower() for s in spec.video_suffixes}
    return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in suffixes)


def main(argv: list[str] | None = None) -> int:
    """Run the command; 0 when every sample is written or was done, 2 on an error."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if (cfg.data is None) == (cfg.clips is None):
        parser.error("give exactly one of --data (a data module config) or --clips (a folder)")
    L.seed_everything(cfg.seed, verbose=False)  # tiny encoders built from config are random
    init = parser.instantiate(cfg)
    report = SkipReport()
    encoders: dict[str, nn.Module] = init.encoders
    try:
        if init.data is not None:
            data: EmotionDataModule = init.data
            data.on_error = init.on_error  # one knob for annotations and clips
            names = [r.name for r in data.load_records()]
            report.extend(data.skip_report)
            root, spec = data.root, data.media
            streams = init.streams or data.streams
            output = Path(init.output) if init.output else data.root
        else:
            if init.output is None or init.streams is None:
                parser.error("--clips needs --output and --streams")
            root, spec = Path(init.clips), replace(init.media, video_dir=".")
            if not root.is_dir():
                raise FileNotFoundError(f"clip folder not found: {root}")
            names = read_names(init.names) if init.names else _clip_names(root, spec)
            streams, output = init.streams, Path(init.output)
        by_name = {s.name: s for s in streams}
        filled = stream_owners(encoders)
        video, audio = media_needs([by_name[n] for n in filled if n in by_name])
        loader = MediaLoader(root, spec, video=video, audio=audio)
        result = extract_features(
            names,
            loader,
            encoders,
            streams,
            output,
            batch_size=init.batch_size,
            num_workers=init.num_workers,
            device=init.device,
            on_error=init.on_error,
            overwrite=init.overwrite,
            progress=init.progress,
            report=report,
        )
    except (MediaDecodeError, FormatError, FileNotFoundError, ValueError) as err:
        print(f"extract: error: {err}", file=sys.stderr)
        return 2
    report_path = Path(init.report) if init.report else output / REPORT_NAME
    if len(result.report):
        result.report.write_csv(report_path)
        print(f"extract: {len(result.report)} sample(s) skipped, listed in {report_path}")
    else:
        report_path.unlink(missing_ok=True)  # a stale report of an earlier run would mislead
    print(f"extract: {result.summary()} -> {output}")
    return 0
