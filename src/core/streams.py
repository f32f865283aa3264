"""Feature streams: which feature folder feeds which modality, and with how many LLM tokens."""

from dataclasses import dataclass

from src.core.modality import Modality


@dataclass(frozen=True)
class StreamSpec:
    """One feature stream of the Emotion-LLaMA feature layout.

    Args:
        name: Short name used in prompts and batches (``face``, ``video``, ``audio``).
        feature_dir: Folder under the data root holding ``<sample name>.npy`` files.
        modality: ``audio`` or ``visual``.
        dim: Feature size of each ``.npy`` vector (each row of a sequence; checked on load).
        tokens: Number of LLM tokens of the stream: made by the projector from one pooled
            vector, or, for a sequence stream, the number of rows (one token per row).
        sequence: ``False``: each file holds one pooled ``(dim,)`` vector, projected to
            ``tokens`` tokens. ``True``: each file holds a ``(tokens, dim)`` array (image patch
            tokens, audio frames) and one shared projector maps every row to one token, as
            Emotion-LLaMA's ``llama_proj`` does for its 256 EVA-CLIP patch tokens.
    """

    name: str
    feature_dir: str
    modality: str
    dim: int
    tokens: int = 1
    sequence: bool = False

    def __post_init__(self) -> None:
        if Modality.parse(self.modality) not in (Modality.AUDIO, Modality.VISUAL):
            raise ValueError(f"stream {self.name!r}: modality must be audio or visual")
        if self.dim < 1 or self.tokens < 1:
            raise ValueError(f"stream {self.name!r}: dim and tokens must be positive")

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample's stored feature: ``(dim,)`` or ``(tokens, dim)``."""
        return (self.tokens, self.dim) if self.sequence else (self.dim,)

    @property
    def modality_id(self) -> Modality:
        """The stream's :class:`Modality`."""
        return Modality.parse(self.modality)


#: Emotion-LLaMA's layout: face MAE and VideoMAE (visual), HuBERT-large (audio), 1024-d each. The
#: token counts mirror its imbalance: many visual tokens, a single audio token.
EMOTION_LLAMA_STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("face", "mae_340_UTT", "visual", 1024, 16),
    StreamSpec("video", "maeV_399_UTT", "visual", 1024, 16),
    StreamSpec("audio", "HL-UTT", "audio", 1024, 1),
)
