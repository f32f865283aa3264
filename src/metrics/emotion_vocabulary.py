"""Emotion vocabulary: surface forms of emotion words and the canonical word each one stands for.

The on-disk form is MER2025's ``emotion_wheel/format.csv`` (columns ``name,format``): ``name`` is
a canonical emotion word and ``format`` a comma-separated list of its morphological variants
(``anger,angry,angrily,...``). A variant may occur in several rows (``abhor`` and ``abhorred``
list the same forms); as in MERTools' ``read_format2raws`` + ``func_backward_case1``, a form maps
to the alphabetically first of the names whose row lists it. That is the whole synonym grouping
of the rule-based pipeline: morphological variants only. Optional extra groups (a JSON list of
lists of words) merge canonical words further; words outside the vocabulary stay as themselves.
"""

import csv
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from src.data.formats.rows import utf8_errors

# A small built-in vocabulary so that extraction works without format.csv. Written for this
# project (not copied from MER2025): common emotion words with their usual inflections.
# Canonical words of the closed label spaces keep the spelling used in src/core/label_space.py.
DEFAULT_EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "neutrality", "neutrally"),
    "happy": ("happy", "happier", "happiest", "happily", "happiness"),
    "angry": ("angry", "angrier", "angriest", "angrily", "anger", "angered"),
    "sad": ("sad", "sadder", "saddest", "sadly", "sadness", "saddened"),
    "worried": ("worried", "worry", "worries", "worrying", "worriedly", "worrisome"),
    "surprise": ("surprise", "surprised", "surprising", "surprisingly", "surprisedly"),
    "fear": ("fear", "fears", "feared", "fearful", "fearfully", "fearfulness"),
    "disgust": ("disgust", "disgusted", "disgusting", "disgustedly"),
    "doubt": ("doubt", "doubts", "doubted", "doubtful", "doubtfully", "doubting"),
    "contempt": ("contempt", "contemptuous", "contemptuously"),
    "joyful": ("joy", "joyful", "joyfully", "joyous", "joyfulness"),
    "excited": ("excited", "excitedly", "excitement", "exciting"),
    "calm": ("calm", "calmly", "calmness", "calmer"),
    "relaxed": ("relaxed", "relaxing", "relaxation"),
    "anxious": ("anxious", "anxiously", "anxiety", "anxieties"),
    "nervous": ("nervous", "nervously", "nervousness"),
    "tense": ("tense", "tension", "tenseness"),
    "stressed": ("stressed", "stressful", "stress"),
    "frustrated": ("frustrated", "frustrating", "frustration"),
    "disappointed": ("disappointed", "disappointing", "disappointment", "disappointedly"),
    "confused": ("confused", "confusing", "confusion", "confusedly"),
    "embarrassed": ("embarrassed", "embarrassing", "embarrassment"),
    "shy": ("shy", "shyly", "shyness"),
    "proud": ("proud", "proudly", "pride"),
    "grateful": ("grateful", "gratefully", "gratitude", "thankful"),
    "helpless": ("helpless", "helplessly", "helplessness"),
    "guilty": ("guilty", "guilt", "guiltily"),
    "ashamed": ("ashamed", "shame", "shameful"),
    "regretful": ("regret", "regretful", "regretfully", "regretting"),
    "jealous": ("jealous", "jealousy", "jealously"),
    "lonely": ("lonely", "loneliness"),
    "bored": ("bored", "boredom"),
    "hopeful": ("hopeful", "hopefulness"),
    "relieved": ("relieved", "relief"),
    "satisfied": ("satisfied", "satisfaction", "satisfying"),
    "dissatisfied": ("dissatisfied", "dissatisfaction"),
    "annoyed": ("annoyed", "annoyance"),
    "irritated": ("irritated", "irritation", "irritable"),
    "upset": ("upset",),
    "scared": ("scared", "scary"),
    "terrified": ("terrified", "terror"),
    "panicked": ("panic", "panicked", "panicky"),
    "shocked": ("shocked", "shock", "shocking"),
    "astonished": ("astonished", "astonishment"),
    "amazed": ("amazed", "amazement"),
    "pleased": ("pleased", "pleasure"),
    "delighted": ("delighted", "delight", "delightful"),
    "cheerful": ("cheerful", "cheerfully", "cheerfulness"),
    "amused": ("amused", "amusement", "amusing"),
    "curious": ("curious", "curiously", "curiosity"),
    "impatient": ("impatient", "impatiently", "impatience"),
    "depressed": ("depressed", "depression", "depressing"),
    "hurt": ("hurt",),
    "furious": ("furious", "furiously", "fury"),
    "resentful": ("resentful", "resentment"),
    "suspicious": ("suspicious", "suspicion", "suspiciously"),
    "desperate": ("desperate", "desperation", "despair"),
    "sorrowful": ("sorrow", "sorrowful"),
    "sympathetic": ("sympathy", "sympathetic"),
    "indifferent": ("indifferent", "indifference"),
    "hateful": ("hate", "hatred", "hateful"),
    "optimistic": ("optimistic", "optimism"),
    "pessimistic": ("pessimistic", "pessimism"),
}

_SPACE = re.compile(r"\s+")


def normalise_word(word: str) -> str:
    """Lower-case ``word``, trim surrounding quotes/punctuation and collapse inner whitespace."""
    return _SPACE.sub(" ", str(word).strip().strip("\"'`.,;:!?()[]{}").strip().lower())


@dataclass(frozen=True)
class EmotionVocabulary:
    """Surface forms of emotion words mapped to canonical words.

    Build it with :meth:`from_format_csv`, :meth:`default` or :meth:`from_rows`.

    Args:
        rows: Canonical word -> its surface forms (the canonical word itself is always a form).
        source: Where the rows came from (a path or ``"builtin"``), recorded in results.
        synonym_groups: Extra groups of words to merge, applied after the row mapping.
    """

    rows: Mapping[str, tuple[str, ...]]
    source: str = "builtin"
    synonym_groups: tuple[tuple[str, ...], ...] = ()
    _canonical: dict[str, str] = field(init=False, repr=False, compare=False)
    _max_words: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        owners: dict[str, set[str]] = {}
        for name, forms in self.rows.items():
            for form in (name, *forms):
                owners.setdefault(normalise_word(form), set()).add(normalise_word(name))
        owners.pop("", None)
        # MER2025 case1: a form shared by several rows maps to the alphabetically first name.
        canonical = {form: min(names) for form, names in owners.items()}
        self._merge_groups(canonical)
        object.__setattr__(self, "_canonical", canonical)
        object.__setattr__(self, "_max_words", max((len(f.split()) for f in canonical), default=1))

    def _merge_groups(self, canonical: dict[str, str]) -> None:
        """Union the canonical words named together in ``synonym_groups`` (union-find)."""
        parent: dict[str, str] = {}

        def find(x: str) -> str:
            while parent.setdefault(x, x) != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for group in self.synonym_groups:
            heads = [canonical.get(w, w) for w in map(normalise_word, group) if w]
            for other in heads[1:]:
                a, b = find(heads[0]), find(other)
                if a != b:
                    # Keep the alphabetically first word as the representative, like case1.
                    parent[max(a, b)] = min(a, b)
        if not parent:
            return
        for group in self.synonym_groups:
            for word in map(normalise_word, group):
                if word and word not in canonical:
                    canonical[word] = word
        for form, head in canonical.items():
            canonical[form] = find(head) if head in parent else head

    @classmethod
    def default(cls, synonym_groups: Iterable[Iterable[str]] = ()) -> "EmotionVocabulary":
        """The built-in vocabulary (about 60 common emotion words with their inflections)."""
        return cls(DEFAULT_EMOTION_WORDS, "builtin", _groups(synonym_groups))

    @classmethod
    def from_format_csv(
        cls, path: str | Path, synonym_groups: Iterable[Iterable[str]] = ()
    ) -> "EmotionVocabulary":
        """Read a MER2025 ``format.csv`` (``name,format``; ``format`` is comma-separated)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"emotion vocabulary {path} does not exist")
        rows: dict[str, tuple[str, ...]] = {}
        with utf8_errors(path) as track, path.open(newline="", encoding="utf-8") as handle:
            reader = track(csv.DictReader(handle))
            missing = {"name", "format"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"{path}: missing column(s) {sorted(missing)}; expected header 'name,format'"
                )
            for line, record in enumerate(reader, start=2):
                name = normalise_word(record["name"] or "")
                if not name:
                    raise ValueError(f"{path}, line {line}: empty 'name'")
                forms = tuple(f for f in map(normalise_word, (record["format"] or "").split(",")))
                rows[name] = rows.get(name, ()) + tuple(f for f in forms if f)
        if not rows:
            raise ValueError(f"{path}: no rows")
        return cls(rows, str(path), _groups(synonym_groups))

    @classmethod
    def load(
        cls, path: str | Path | None = None, synonyms: str | Path | None = None
    ) -> "EmotionVocabulary":
        """``format.csv`` at ``path`` or the built-in vocabulary, plus synonym groups from JSON.

        Args:
            path: A ``name,format`` CSV file; ``None`` selects the built-in vocabulary.
            synonyms: A JSON file holding a list of lists of words to merge, or ``None``.
        """
        groups: list[list[str]] = []
        if synonyms is not None:
            synonyms = Path(synonyms)
            try:
                groups = json.loads(synonyms.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:  # JSON or UTF-8 decoding
                raise ValueError(f"{synonyms}: cannot read synonym groups: {err}") from err
            if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
                raise ValueError(f"{synonyms}: synonym groups must be a JSON list of lists")
        if path is None:
            return cls.default(groups)
        return cls.from_format_csv(path, groups)

    @property
    def max_words(self) -> int:
        """Number of words in the longest surface form (multi-word forms like ``at ease``)."""
        return self._max_words

    def __contains__(self, word: str) -> bool:
        return normalise_word(word) in self._canonical

    def __len__(self) -> int:
        return len(self._canonical)

    def canonical(self, word: str) -> str | None:
        """Canonical word for a surface form, or ``None`` when it is not in the vocabulary."""
        return self._canonical.get(normalise_word(word))

    def group(self, word: str) -> str:
        """Canonical word for ``word``, or the normalised word itself outside the vocabulary."""
        word = normalise_word(word)
        return self._canonical.get(word, word)

    @property
    def identity(self) -> dict[str, str]:
        """What to record in results: the source and the size of the vocabulary."""
        return {
            "source": self.source,
            "forms": str(len(self._canonical)),
            "canonical_words": str(len(set(self._canonical.values()))),
            "synonym_groups": str(len(self.synonym_groups)),
        }


def _groups(groups: Iterable[Iterable[str]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(str(w) for w in g) for g in groups)
