"""The in-memory form of one annotated sample, shared by every data-set parser and data module."""

from dataclasses import dataclass

#: CA-MER test subsets, in the order tables and plots show them.
SUBSETS: tuple[str, ...] = ("video_aligned", "audio_aligned", "consistent")
SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SampleRecord:
    """One sample as read from a data set's annotation files (labels are canonical words).

    Args:
        name: Sample id; feature files are ``<feature_dir>/<name>.npy``, media ``<name>.mp4`` etc.
        split: ``train``, ``val`` or ``test``.
        label: True emotion (canonical word of the label space), or ``None`` when unlabelled.
        subtitle: Transcript in the chosen language, or ``""``.
        subset: CA-MER subset (``video_aligned``, ``audio_aligned``, ``consistent``) or ``None``.
        video_label: Emotion shown by the visual stream, when annotated.
        audio_label: Emotion shown by the audio stream, when annotated.
        reason: Reference reasoning text (EMER, CA-MER), when present.
        valence: Valence score (MER2023), when present.
        media: Path of the raw clip relative to the data root, when known.
    """

    name: str
    split: str = "test"
    label: str | None = None
    subtitle: str = ""
    subset: str | None = None
    video_label: str | None = None
    audio_label: str | None = None
    reason: str | None = None
    valence: float | None = None
    media: str | None = None
