"""A user's own clips as a data module: one video file or a folder of them, decoded online.

``python -m src.cli predict ... --data.clips <file or folder>`` (see ``conf/experiment/
predict_clips.yaml``): every clip is decoded through the same :class:`MediaLoader` as training
with ``source: media`` and ``extract`` (same frame sampling, resize, audio resampling), and the
model's online encoders compute its features, so nothing is zeroed or shortcut. Labels are
unknown (``-1``) and there are no CA-MER subsets.
"""

from pathlib import Path
from typing import Any, Literal

from src.core.records import SampleRecord
from src.core.streams import EMOTION_LLAMA_STREAMS, StreamSpec
from src.data.base_datamodule import EmotionDataModule
from src.data.components.collate import EmotionCollator
from src.data.components.media import MediaDecodeError
from src.data.components.media_source import MediaLoader, MediaSpec, media_needs
from src.data.components.prompt import PromptBuilder
from src.data.components.tokenizer import load_tokenizer
from src.data.formats.rows import FormatError
from src.data.formats.subtitles import read_subtitles

#: Batch keys of one prompt (what :meth:`MultimodalEmotionLLM.generate` reads besides features).
PROMPT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "modality_ids", "stream_ids")
SIDECAR_SUFFIX = ".txt"


def find_clips(clips: str | Path, suffixes: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """``name -> path`` of one clip file or of every clip under a folder (recursively).

    The name is the file stem. Hidden files (``.name``) are left out of a folder scan. Two clips
    with the same stem (in two sub-folders, or ``x.mp4`` beside ``x.avi``) are an error naming
    both, since records, subtitles and outputs are keyed by name.
    """
    path = Path(clips)
    if path.is_file():
        return {path.stem: path}
    if not path.is_dir():
        raise FileNotFoundError(f"clips: {path} is neither a video file nor a folder")
    wanted = {s.lower() for s in suffixes}
    found: dict[str, Path] = {}
    for file in sorted(path.rglob("*")):
        relative = file.relative_to(path).parts
        if any(part.startswith(".") for part in relative) or not file.is_file():
            continue
        if file.suffix.lower() not in wanted:
            continue
        if file.stem in found:
            raise FormatError(
                file,
                "name",
                f"two clips are named {file.stem!r} ({found[file.stem]} and {file}); "
                "rename one or point --data.clips at one folder",
                name=file.stem,
            )
        found[file.stem] = file
    if not found:
        raise FileNotFoundError(f"clips: no {', '.join(sorted(wanted))} files under {path}")
    return found


class ClipPathLoader(MediaLoader):
    """A :class:`MediaLoader` whose clips are given by path rather than found by name.

    Decoding (frames and the clip's own audio track) is the parent's, unchanged.

    Args:
        paths: Sample name -> clip file.
        spec: Decoding settings (``video_dir`` and ``audio_dir`` are not used).
        video: Decode frames.
        audio: Decode audio.
    """

    def __init__(
        self, paths: dict[str, Path], spec: MediaSpec, *, video: bool, audio: bool
    ) -> None:
        super().__init__(".", spec, video=video, audio=audio)
        self.paths = dict(paths)
        self.audio_dir = None  # a user's clip carries its own audio track

    def clip_path(self, name: str) -> Path:
        if name not in self.paths:
            raise MediaDecodeError(name, "path", f"no clip named {name!r} in the clip list")
        return self.paths[name]


class ClipsCollator(EmotionCollator):
    """The shared collator, plus each clip's subtitle and, when the prompt templates have a
    ``reason`` task, the reasoning prompt of the same clip under ``batch["reason_prompt"]``
    (``input_ids``, ``attention_mask``, ``modality_ids``, ``stream_ids``) for generation."""

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(items)
        batch["subtitles"] = [it["subtitle"] for it in items]
        if "reason" in self.prompt_builder.templates:
            # Prompt tokens only: no media is stacked a second time.
            light = [
                {"name": it["name"], "subtitle": it["subtitle"], "label": -1, "task": "reason"}
                for it in items
            ]
            reason = super().__call__(light)
            batch["reason_prompt"] = {k: reason[k] for k in PROMPT_KEYS}
        return batch


class ClipsDataModule(EmotionDataModule):
    """A video file or a folder of clips (``.mp4``, ``.mkv``, ``.avi``, ``.mov``, ``.webm``) with
    their own audio tracks, for ``predict``.

    Everything else (tokenizer, label space, streams, prompt templates, ``media`` decoding
    settings) must be the model's training values: layered over a training config with
    ``--config``, the init args this class shares with the training data module are kept.

    Args:
        clips: One clip file, or a folder searched recursively for clips. A clip's name is its
            file stem (it must be unique).
        subtitle_csv: Optional subtitle CSV with columns ``name`` and ``subtitle_column``.
        subtitle_column: The CSV's text column (``english``, ``chinese``, ``sentence``).
        sidecar_subtitles: Read ``<clip stem>.txt`` beside a clip as its subtitle when the CSV
            has none for it.
        root: Data root; only the default tokenizer directory ``<root>/tokenizer`` depends on it
            (default: the clips folder).
        streams: The model's feature streams (the online encoders' outputs).
        tokenizer: Local tokenizer directory of the model.
        label_space: The model's label space.
        task: Prompt of the closed-set answer (``emotion``).
        batch_size: Clips per batch.
        eval_batch_size: Clips per batch in ``predict`` (default: ``batch_size``).
        num_workers: DataLoader workers decoding clips.
        on_error: ``raise``: a clip that cannot be decoded stops the run with its file and
            field; ``skip``: it is listed in :attr:`skipped` and in the report.
        templates: Prompt templates per task (the training ones).
        prompt_format: ``auto``, ``chat`` or ``inst``, as in training.
        placeholder_tokens: Stream name -> the token its positions hold, as in training.
        media: Decoding settings: frame sampling, frame size, audio rate (the training ones;
            ``video_dir``/``audio_dir`` are ignored).
        media_check: What :meth:`setup` checks of every clip: ``probe`` (headers), ``decode``
            (decodes every clip once more: also truncated streams, so that ``on_error: skip``
            catches them before predicting) or ``none``.
    """

    def __init__(
        self,
        clips: str,
        subtitle_csv: str | None = None,
        subtitle_column: str = "english",
        sidecar_subtitles: bool = True,
        root: str | None = None,
        streams: list[StreamSpec] = list(EMOTION_LLAMA_STREAMS),  # noqa: B006 - jsonargparse default
        tokenizer: str | None = None,
        label_space: str | list[str] = "mer2023",
        task: Literal["emotion", "reason"] = "emotion",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        on_error: Literal["raise", "skip"] = "raise",
        templates: dict[str, str] | None = None,
        prompt_format: Literal["auto", "chat", "inst"] = "auto",
        placeholder_tokens: dict[str, str] | None = None,
        media: MediaSpec | None = None,
        media_check: Literal["none", "probe", "decode"] = "probe",
    ) -> None:
        clips_path = Path(clips)
        default_root = clips_path.parent if clips_path.is_file() else clips_path
        super().__init__(
            str(root if root is not None else default_root),
            streams=streams,
            tokenizer=tokenizer,
            label_space=label_space,
            task=task,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            on_error=on_error,
            templates=templates,
            prompt_format=prompt_format,
            placeholder_tokens=placeholder_tokens,
            source="media",  # always: raw clips through the model's encoders
            media=media,
            media_check=media_check,
        )
        self.clips = clips_path
        self.subtitle_csv = subtitle_csv
        self.subtitle_column = subtitle_column
        self.sidecar_subtitles = sidecar_subtitles
        self._paths: dict[str, Path] | None = None
        #: Where each clip's subtitle came from: ``csv``, ``sidecar`` or ``none``.
        self.subtitle_sources: dict[str, str] = {}

    @property
    def clip_paths(self) -> dict[str, Path]:
        """Clip name -> file (found on first use)."""
        if self._paths is None:
            self._paths = find_clips(self.clips, self.media.video_suffixes)
        return self._paths

    def load_records(self) -> list[SampleRecord]:
        texts = (
            read_subtitles(self.subtitle_csv, column=self.subtitle_column, **self.parse_options)
            if self.subtitle_csv
            else {}
        )
        records = []
        for name, path in self.clip_paths.items():
            subtitle, source = texts.get(name), "csv"
            sidecar = path.with_suffix(SIDECAR_SUFFIX)
            if subtitle is None and self.sidecar_subtitles and sidecar.is_file():
                subtitle, source = sidecar.read_text(encoding="utf-8").strip(), "sidecar"
            if subtitle is None:
                subtitle, source = "", "none"
            self.subtitle_sources[name] = source
            records.append(
                SampleRecord(name=name, split="test", subtitle=subtitle, media=str(path))
            )
        return records

    def media_loader(self) -> MediaLoader:
        video, audio = media_needs(self.streams)
        return ClipPathLoader(self.clip_paths, self.media, video=video, audio=audio)

    @property
    def collator(self) -> EmotionCollator:
        if self._collator is None:
            builder = PromptBuilder(
                load_tokenizer(self.tokenizer_path),
                self.streams,
                self.label_names,
                self.templates,
                self.prompt_format,
                self.placeholder_tokens,
            )
            self._collator = ClipsCollator(builder)
        return self._collator

    def train_dataloader(self) -> Any:
        raise RuntimeError("ClipsDataModule has unlabelled clips for predict only, not for fit")
