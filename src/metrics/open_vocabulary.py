"""Open-vocabulary scoring: emotion words from free text, and MER2024's set-level metrics.

Pipeline (``docs/evaluation.md`` has the formulas):

1. an :class:`EmotionExtractor` turns a generated text into a list of emotion words
   (:class:`RuleBasedExtractor`: vocabulary look-up with a negation rule;
   :class:`LocalLMJudgeExtractor`: a local Hugging Face causal LM asked greedily, with a cache);
2. words are grouped by :meth:`EmotionVocabulary.group` (morphological variants -> one word);
3. per sample, set accuracy ``|G∩P|/|P|`` and set recall ``|G∩P|/|G|``, averaged over samples.

A text that yields no emotion word is *unparsed*: it is counted (``ov_unparsed_rate``) and scores
zero, exactly as MER2024's reference code scores an empty prediction; it is never mapped to a
label. :func:`text_to_label` is the closed-set counterpart: one label word or ``None``.
"""

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from src.core.label_space import LabelSpace
from src.core.records import SUBSETS
from src.io.atomic import atomic_write_text
from src.metrics.emotion_vocabulary import EmotionVocabulary, normalise_word

Scope = Literal["auto", "all", "conclusion"]
OOVPolicy = Literal["keep", "drop"]

# Words, with inner hyphens/apostrophes kept ("self-deprecating", "doesn't"); anything else that
# ends a clause is a boundary the negation rule does not cross.
_TOKEN = re.compile(r"[a-z]+(?:['’\-][a-z]+)*|[.,;:!?()\"\n]")
_BOUNDARY = frozenset('.,;:!?()"\n')
_NEGATORS = frozenset(
    {"not", "no", "never", "without", "hardly", "barely", "neither", "nor", "nothing", "cannot"}
)
# Contrast words end a negation's reach: "not angry but happy" negates only "angry".
_CONTRAST = frozenset({"but", "yet", "though", "although", "however", "instead", "rather", "while"})
#: Tokens looked back from an emotion word for a negator (same clause only).
NEGATION_WINDOW = 3
# The conclusion of a reasoning text ("... therefore, his emotional state is anger"): the last
# of these cues starts the span the "auto"/"conclusion" scopes read.
_CONCLUSION = re.compile(
    r"\b(?:emotional state|emotional states|emotions?|feelings?|mood)\s+"
    r"(?:is|are|was|were|seems?|appears?|could be|might be|would be|can be)\b"
    r"|\binferred that\b|\bconclude[sd]? that\b|\btherefore\b|\bin summary\b|\boverall\b"
)
#: Vocabulary forms that describe having an emotion rather than name one; never extracted.
DEFAULT_EXCLUDE: frozenset[str] = frozenset(
    {"emotion", "emotions", "emotional", "emotionally", "emotionals", "feeling", "feelings"}
    | {"mood", "moods", "person", "persons", "state", "states"}
)


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(str(text).lower().replace("’", "'"))


def _is_negator(token: str) -> bool:
    return token in _NEGATORS or token.endswith("n't")


def _negated(tokens: Sequence[str], start: int) -> bool:
    """Whether a negator precedes ``tokens[start]`` within the window, in the same clause.

    The look-back stops at punctuation and at contrast words (``but``, ``yet``, ...).
    """
    for j in range(start - 1, max(-1, start - 1 - NEGATION_WINDOW), -1):
        tok = tokens[j]
        if tok in _BOUNDARY or tok in _CONTRAST:
            return False
        # "not only happy but also ...": an intensifier, not a negation.
        if _is_negator(tok) and not (j + 1 < len(tokens) and tokens[j + 1] == "only"):
            return True
    return False


def _scoped_texts(text: str, scope: Scope) -> list[str]:
    """Texts to search, in order: the conclusion (after the last cue) and/or the whole text."""
    if scope == "all":
        return [text]
    lowered = str(text).lower()
    cues = list(_CONCLUSION.finditer(lowered))
    if not cues:
        return [text] if scope == "auto" else []
    tail = lowered[cues[-1].end() :]
    return [tail, text] if scope == "auto" else [tail]


def find_spans(
    text: str,
    lookup: Any,
    max_words: int,
    *,
    negation: bool = True,
    exclude: frozenset[str] = frozenset(),
) -> list[str]:
    """Surface forms in ``text`` for which ``lookup(form)`` is not ``None``, longest match first.

    Args:
        text: Free text.
        lookup: Callable form -> canonical word or ``None``.
        max_words: Longest form, in words.
        negation: Skip forms preceded by a negator (``not``, ``never``, ``n't``, ...) within
            :data:`NEGATION_WINDOW` tokens of the same clause.
        exclude: Forms never returned.
    """
    tokens = _tokens(text)
    found: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(max_words, len(tokens) - i), 0, -1):
            window = tokens[i : i + n]
            if any(t in _BOUNDARY for t in window):
                continue
            form = " ".join(window)
            if form in exclude or lookup(form) is None:
                continue
            if not (negation and _negated(tokens, i)):
                found.append(form)
            i += n
            break
        else:
            i += 1
    return found


class EmotionExtractor(ABC):
    """Turns free text into emotion words; an empty list means the text is unparsed."""

    @abstractmethod
    def extract(self, text: str) -> list[str]:
        """Distinct emotion words of ``text`` in order of appearance (lower case)."""

    def extract_many(self, texts: Sequence[str]) -> list[list[str]]:
        """:meth:`extract` over ``texts``."""
        return [self.extract(t) for t in texts]

    @property
    @abstractmethod
    def identity(self) -> dict[str, str]:
        """What produced the words, recorded in every result file."""


class RuleBasedExtractor(EmotionExtractor):
    """Vocabulary look-up over the text, with a negation rule and a conclusion scope.

    Args:
        vocabulary: Emotion words and their variants; the built-in list when ``None``.
        negation: Drop emotion words preceded by a negator in the same clause
            (``"he is not angry but sad"`` -> ``["sad"]``).
        scope: ``"auto"`` reads the conclusion of a reasoning text (after the last cue such as
            ``"emotional state is"`` or ``"therefore"``) and falls back to the whole text when
            that yields nothing; ``"all"`` always reads the whole text; ``"conclusion"`` only
            the conclusion.
        exclude: Forms never extracted (default :data:`DEFAULT_EXCLUDE`).
    """

    def __init__(
        self,
        vocabulary: EmotionVocabulary | None = None,
        negation: bool = True,
        scope: Scope = "auto",
        exclude: frozenset[str] | None = None,
    ) -> None:
        if scope not in ("auto", "all", "conclusion"):
            raise ValueError(f"scope must be 'auto', 'all' or 'conclusion', got {scope!r}")
        self.vocabulary = vocabulary if vocabulary is not None else EmotionVocabulary.default()
        self.negation = negation
        self.scope = scope
        self.exclude = DEFAULT_EXCLUDE if exclude is None else frozenset(exclude)

    def extract(self, text: str) -> list[str]:
        for part in _scoped_texts(text or "", self.scope):
            forms = find_spans(
                part,
                self.vocabulary.canonical,
                self.vocabulary.max_words,
                negation=self.negation,
                exclude=self.exclude,
            )
            if forms:
                return list(dict.fromkeys(forms))
        return []

    @property
    def identity(self) -> dict[str, str]:
        return {
            "extractor": "rule_based",
            "negation": str(self.negation),
            "scope": self.scope,
            **{f"vocabulary_{k}": v for k, v in self.vocabulary.identity.items()},
        }


def text_to_label(
    text: str, label_space: LabelSpace, *, negation: bool = True, scope: Scope = "auto"
) -> int | None:
    """Class index named by ``text``, or ``None`` when it names no label or several.

    The whole text is tried first (``"Happy."``); otherwise label words and the label space's
    synonyms are searched with the same negation and scope rules as :class:`RuleBasedExtractor`.
    Two different labels (``"happy or sad"``) are ambiguous: ``None``, never a guess.
    """
    whole = label_space.normalise(normalise_word(text or ""))
    if whole is not None:
        return label_space.labels.index(whole)
    for part in _scoped_texts(text or "", scope):
        forms = find_spans(part, label_space.normalise, 3, negation=negation)
        labels = {label_space.normalise(f) for f in forms}
        if len(labels) == 1:
            return label_space.labels.index(labels.pop())
        if len(labels) > 1:
            return None
    return None


# --------------------------------------------------------------------------------------------
# A local Hugging Face LM as judge
# --------------------------------------------------------------------------------------------

DEFAULT_JUDGE_PROMPT = (
    "List the emotions that the following description attributes to the person. "
    "Answer with emotion words separated by commas, or 'none'.\n"
    "Description: {text}\n"
    "Emotions:"
)


def parse_judge_output(output: str) -> list[str]:
    """Emotion words from a judge's answer: its first line, split on commas/semicolons/``and``."""
    line = next((ln for ln in str(output).strip().splitlines() if ln.strip()), "")
    words = []
    for piece in re.split(r",|;|/|\band\b|\bor\b", line.lower()):
        word = normalise_word(piece)
        if word and word not in ("none", "n/a", "unknown") and len(word.split()) <= 4:
            words.append(word)
    return list(dict.fromkeys(words))


class LocalLMJudgeExtractor(EmotionExtractor):
    """Ask a local causal LM for the emotion words of a text; greedy, cached, identified.

    The model is read from a local directory only (``local_files_only=True``); nothing is
    downloaded. Decoding is greedy (temperature zero: ``do_sample=False``, one beam) and
    limited to ``max_new_tokens``. Answers are cached in a JSON file keyed by
    ``sha256(judge id + prompt)``, so a rerun with the same judge costs nothing and a changed
    model, prompt or length limit never reuses stale answers.

    Args:
        model_dir: Directory holding ``config.json``, the weights and the tokenizer.
        cache_path: JSON cache file; ``None`` keeps the cache in memory only.
        max_new_tokens: Length limit of an answer.
        prompt_template: Prompt with a ``{text}`` field.
        device: Torch device for the judge.
        use_chat_template: Wrap the prompt with the tokenizer's chat template when it has one.
    """

    def __init__(
        self,
        model_dir: str | Path,
        cache_path: str | Path | None = None,
        max_new_tokens: int = 32,
        prompt_template: str = DEFAULT_JUDGE_PROMPT,
        device: str = "cpu",
        use_chat_template: bool = True,
    ) -> None:
        path = Path(model_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"judge model {str(model_dir)!r} is not a local directory. Nothing is downloaded: "
                "point the judge at a local directory holding config.json, the weights and the "
                "tokenizer (for example one written by save_pretrained)."
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"judge model directory {path} has no config.json")
        if "{text}" not in prompt_template:
            raise ValueError("prompt_template needs a '{text}' field")
        self.model_dir = path.resolve()
        self.max_new_tokens = int(max_new_tokens)
        self.prompt_template = prompt_template
        self.device = device
        self.use_chat_template = use_chat_template
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self._cache: dict[str, dict[str, Any]] = self._read_cache()
        self._model: Any = None
        self._tokenizer: Any = None
        self._config_hash = self._hash_config()

    def _hash_config(self) -> str:
        digest = hashlib.sha256()
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            file = self.model_dir / name
            if file.is_file():
                digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
        digest.update(f"{self.max_new_tokens}\0{self.use_chat_template}\0".encode())
        digest.update(self.prompt_template.encode())
        return digest.hexdigest()

    @property
    def judge_id(self) -> str:
        """``<resolved path>#<first 16 hex digits of the config hash>``: the cache namespace."""
        return f"{self.model_dir}#{self._config_hash[:16]}"

    @property
    def identity(self) -> dict[str, str]:
        return {
            "extractor": "local_lm_judge",
            "path": str(self.model_dir),
            "config_sha256": self._config_hash,
            "decoding": "greedy (do_sample=False, num_beams=1)",
            "max_new_tokens": str(self.max_new_tokens),
        }

    def _read_cache(self) -> dict[str, dict[str, Any]]:
        if self.cache_path is None or not self.cache_path.exists():
            return {}
        try:
            data = json.loads(self.cache_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"judge cache {self.cache_path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"judge cache {self.cache_path}: expected a JSON object")
        return data

    def _write_cache(self) -> None:
        if self.cache_path is not None:
            atomic_write_text(self.cache_path, json.dumps(self._cache, indent=1, sort_keys=True))

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, local_files_only=True)
        self._model = model.to(self.device).eval()

    def _prompt(self, text: str) -> str:
        return self.prompt_template.format(text=" ".join(str(text).split()))

    def _key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.judge_id}\n{prompt}".encode()).hexdigest()

    def _generate(self, prompt: str) -> str:
        import torch
        from transformers import GenerationConfig

        self._load()
        tok = self._tokenizer
        if self.use_chat_template and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )
        else:
            ids = tok(prompt, return_tensors="pt")
        ids = {k: v.to(self.device) for k, v in ids.items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        with torch.inference_mode():
            out = self._model.generate(**ids, generation_config=config)
        new_tokens = out[0, ids["input_ids"].shape[1] :]
        return tok.decode(new_tokens, skip_special_tokens=True)

    def _lookup(self, text: str) -> tuple[list[str], bool]:
        prompt = self._prompt(text)
        key = self._key(prompt)
        hit = self._cache.get(key)
        if hit is not None:
            return list(hit["words"]), False
        output = self._generate(prompt)
        words = parse_judge_output(output)
        self._cache[key] = {
            "judge": self.judge_id,
            "prompt": prompt,
            "output": output,
            "words": words,
        }
        return words, True

    def extract(self, text: str) -> list[str]:
        words, new = self._lookup(text)
        if new:
            self._write_cache()
        return words

    def extract_many(self, texts: Sequence[str]) -> list[list[str]]:
        results, any_new = [], False
        for text in texts:
            words, new = self._lookup(text)
            results.append(words)
            any_new |= new
        if any_new:
            self._write_cache()
        return results


# --------------------------------------------------------------------------------------------
# MER2024 set-level accuracy and recall
# --------------------------------------------------------------------------------------------


def group_words(
    words: Sequence[str], vocabulary: EmotionVocabulary, oov: OOVPolicy = "keep"
) -> set[str]:
    """The set of synonym groups named by ``words``.

    Args:
        words: Emotion words (any case).
        vocabulary: Maps variants to their canonical word.
        oov: ``"keep"`` keeps a word outside the vocabulary as its own group (MER2024's
            reference code); ``"drop"`` removes it (MER2025's ``case1``).
    """
    if oov not in ("keep", "drop"):
        raise ValueError(f"oov must be 'keep' or 'drop', got {oov!r}")
    groups = set()
    for word in words:
        canonical = vocabulary.canonical(word)
        if canonical is None and oov == "keep":
            canonical = normalise_word(word) or None
        if canonical is not None:
            groups.add(canonical)
    return groups


def set_scores(gold: set[str], pred: set[str]) -> tuple[float, float] | None:
    """``(|G∩P|/|P|, |G∩P|/|G|)``; ``(0, 0)`` for an empty prediction, ``None`` for empty gold."""
    if not gold:
        return None
    if not pred:
        return 0.0, 0.0
    hit = len(gold & pred)
    return hit / len(pred), hit / len(gold)


@dataclass(frozen=True)
class OpenVocabularySample:
    """Gold and predicted emotion words of one sample.

    Args:
        name: Sample id.
        gold: Reference emotion words.
        pred: Predicted (extracted) emotion words; empty when the output yielded none.
        subset: CA-MER subset, or ``None``.
    """

    name: str
    gold: Sequence[str]
    pred: Sequence[str]
    subset: str | None = None


def open_vocabulary_metrics(
    samples: Sequence[OpenVocabularySample],
    vocabulary: EmotionVocabulary,
    *,
    oov: OOVPolicy = "keep",
    prefix: str = "test/",
    subsets: Sequence[str] = SUBSETS,
) -> tuple[dict[str, float], dict[str, int]]:
    """MER2024 set-level accuracy, recall and their mean, overall and per subset.

    Returns ``(metrics, counts)``. Metric keys: ``{prefix}ov_acc``, ``ov_recall``, ``ov_mean``,
    ``ov_unparsed_rate`` (share of scored samples whose prediction has no emotion word), the same
    under ``{prefix}<subset>/`` for every non-empty subset, and ``{prefix}ov_modality_gap`` (the
    audio_aligned minus the video_aligned ``ov_mean``) when both exist. Samples whose gold set
    is empty are not scored and are counted in ``counts["ov_no_gold"]``.
    """
    per_group: dict[str | None, list[tuple[float, float, bool]]] = {}
    no_gold = 0
    for sample in samples:
        gold = group_words(sample.gold, vocabulary, oov)
        pred = group_words(sample.pred, vocabulary, oov)
        scores = set_scores(gold, pred)
        if scores is None:
            no_gold += 1
            continue
        entry = (*scores, not pred)
        per_group.setdefault(None, []).append(entry)
        if sample.subset is not None:
            if sample.subset not in subsets:
                raise ValueError(f"sample {sample.name}: unknown subset {sample.subset!r}")
            per_group.setdefault(sample.subset, []).append(entry)

    metrics: dict[str, float] = {}
    for key in (None, *subsets):
        entries = per_group.get(key)
        if not entries:
            continue
        head = prefix if key is None else f"{prefix}{key}/"
        acc = sum(e[0] for e in entries) / len(entries)
        rec = sum(e[1] for e in entries) / len(entries)
        metrics[f"{head}ov_acc"] = acc
        metrics[f"{head}ov_recall"] = rec
        metrics[f"{head}ov_mean"] = (acc + rec) / 2
        metrics[f"{head}ov_unparsed_rate"] = sum(e[2] for e in entries) / len(entries)
    audio, video = f"{prefix}audio_aligned/ov_mean", f"{prefix}video_aligned/ov_mean"
    if audio in metrics and video in metrics:
        metrics[f"{prefix}ov_modality_gap"] = metrics[audio] - metrics[video]
    scored = len(per_group.get(None, []))
    counts = {
        "ov_scored": scored,
        "ov_unparsed": sum(e[2] for e in per_group.get(None, [])),
        "ov_no_gold": no_gold,
    }
    return metrics, counts


def read_openset_cell(cell: str, *, where: str) -> list[str]:
    """Parse an ``openset`` cell: a Python/JSON list string (``"['happy', 'relaxed']"``).

    Args:
        cell: The cell text; empty means no words.
        where: ``"<file>, line <n>"`` for error messages.
    """
    import ast

    text = (cell or "").strip()
    if not text:
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(
            f"{where}: field 'openset' is not a list literal like \"['happy', 'relaxed']\": "
            f"{text[:80]!r}"
        ) from None
    if not isinstance(value, list | tuple) or not all(isinstance(w, str) for w in value):
        raise ValueError(f"{where}: field 'openset' must be a list of strings, got {text[:80]!r}")
    return [w for w in (normalise_word(v) for v in value) if w]
