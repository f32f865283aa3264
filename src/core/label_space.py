"""Closed label spaces of the supported data sets, with case and synonym normalisation."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# Surface forms that annotators and models use for each canonical label. Keys are canonical.
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutrality", "calm", "neutral emotion"),
    "happy": ("happiness", "joy", "joyful", "glad", "pleased", "delighted", "happily"),
    "angry": ("anger", "mad", "furious", "annoyed", "irritated", "angrily"),
    "sad": ("sadness", "sorrow", "sorrowful", "unhappy", "upset", "sadly"),
    "worried": ("worry", "anxious", "anxiety", "nervous", "concerned", "worrying"),
    "surprise": ("surprised", "astonished", "amazed", "astonishment", "surprising"),
    "fear": ("fearful", "afraid", "scared", "frightened", "terrified"),
    "disgust": ("disgusted", "disgusting", "revulsion"),
    "doubt": ("doubtful", "skeptical", "sceptical", "suspicious", "uncertain"),
    "contempt": ("contemptuous", "disdain", "scorn"),
}


@dataclass(frozen=True)
class LabelSpace:
    """An ordered set of canonical labels; index ``i`` is class ``i`` everywhere in the framework.

    Args:
        name: Short name of the label space (``mer2023``, ``dfew``, ``merr``).
        labels: Canonical label words in class-index order.
    """

    name: str
    labels: tuple[str, ...]
    _lookup: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lookup: dict[str, str] = {}
        for label in self.labels:
            for form in (label, *_SYNONYMS.get(label, ())):
                lookup[form] = label
        object.__setattr__(self, "_lookup", lookup)

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, word: str) -> str | None:
        """Canonical label for ``word`` (any case, synonyms accepted), or ``None`` if outside."""
        return self._lookup.get(" ".join(str(word).strip().lower().split()))

    def index(self, word: str, *, source: str = "label") -> int:
        """Class index of ``word``; raises ``ValueError`` naming ``source`` when unknown."""
        label = self.normalise(word)
        if label is None:
            raise ValueError(
                f"{source}: {word!r} is not in the {self.name} label space "
                f"({', '.join(self.labels)})"
            )
        return self.labels.index(label)

    def indices(self, words: Iterable[str], *, source: str = "label") -> list[int]:
        """Class indices of ``words``."""
        return [self.index(w, source=source) for w in words]


MER2023 = LabelSpace("mer2023", ("neutral", "angry", "happy", "sad", "worried", "surprise"))
# DFEW official label k (1-7) is class k-1 here; DFER-CLIP's label0 is already this index.
DFEW = LabelSpace("dfew", ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"))
MERR = LabelSpace(
    "merr",
    ("neutral", "happy", "angry", "worried", "surprise", "sad", "fear", "doubt", "contempt"),
)

LABEL_SPACES: dict[str, LabelSpace] = {space.name: space for space in (MER2023, DFEW, MERR)}


def get_label_space(name_or_labels: str | Sequence[str]) -> LabelSpace:
    """A label space by name, or a custom one from an explicit list of labels."""
    if isinstance(name_or_labels, str):
        try:
            return LABEL_SPACES[name_or_labels.lower()]
        except KeyError:
            raise ValueError(
                f"unknown label space {name_or_labels!r}; known: {', '.join(LABEL_SPACES)} "
                "(or give an explicit list of labels)"
            ) from None
    labels = tuple(str(x).strip().lower() for x in name_or_labels)
    if len(set(labels)) != len(labels) or not labels:
        raise ValueError(f"a custom label space needs distinct, non-empty labels, got {labels}")
    return LabelSpace("custom", labels)
