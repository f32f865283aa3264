"""``python -m src.cli score``: every applicable metric from a prediction file, for any model.

Examples::

    python -m src.cli score --predictions outputs/predictions.csv --output results.json
    python -m src.cli score --predictions predict-openset.csv --references check-openset.csv \\
        --vocabulary format.csv
    python -m src.cli score --predictions output_Emotion-LLaMA.csv --format emotion-llama \\
        --references gt-eng.csv --vocabulary format.csv

Prediction formats (``--format auto`` tells them apart by their header):

- ``mosear``: our :class:`PredictionCSVWriter` file (``name,subset,label,prediction,score_*,
  text,extracted``);
- ``emotion-llama``: Emotion-LLaMA's outputs, either the reasoning file its EMER script writes
  (``names,chi_reasons``: sample id and generated text) or the per-sample classification records
  of its evaluator (``sample_id,prediction,target``: id, raw generated answer, gold label);
- ``openset``: MER2024's ``name,openset`` (a list of emotion words per sample).

References (``--references``, joined on the sample id) supply what the prediction file lacks:
``label`` / ``discrete`` / ``emotions`` / ``target`` (closed-set gold), ``subset``, ``openset``
(open-vocabulary gold) or ``reason`` / ``reasons`` (reference reasoning: its emotion words are
extracted with the same extractor as the predictions, EMER-style). CA-MER manifests, MER2023
label files, EMER ``gt-eng.csv`` and MER2024 ``check-openset.csv`` all work as they are.

Nothing is guessed: a predicted word outside the label space is *unparsed* (counted, listed in
``unknown_predictions`` and scored as wrong), never mapped to a label.
"""

import csv
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from src.core.errors import STRICT_PARSER, InvalidInputError
from src.core.label_space import LABEL_SPACES, MER2023, LabelSpace, get_label_space
from src.core.records import SUBSETS
from src.data.formats.rows import utf8_errors
from src.io.atomic import atomic_open
from src.metrics.defaults import DEFAULT_BOOTSTRAP_RESAMPLES
from src.metrics.emotion_vocabulary import EmotionVocabulary, normalise_word
from src.metrics.open_vocabulary import (
    EmotionExtractor,
    LocalLMJudgeExtractor,
    OpenVocabularySample,
    RuleBasedExtractor,
    open_vocabulary_metrics,
    read_openset_cell,
    text_to_label,
)

FORMATS = ("auto", "mosear", "emotion-llama", "openset")
_NAME_COLUMNS = ("name", "names", "sample_id")
_LABEL_COLUMNS = ("label", "discrete", "emotions", "target")
_REASON_COLUMNS = ("reason", "reasons")


@dataclass
class ScoredSample:
    """One sample as the scorer sees it, after joining predictions and references.

    Args:
        name: Sample id.
        where: ``"<file>, line <n>"`` of its prediction row, for messages.
        subset: CA-MER subset or ``None``.
        label: Gold label word (canonical) or ``None``.
        prediction: Predicted label word as written in the file, or ``None``.
        text: Generated text, or ``None``.
        openset: Predicted emotion words given directly (``openset`` format), or ``None``.
        gold_openset: Gold emotion words, or ``None``.
        gold_reason: Reference reasoning text to extract gold words from, or ``None``.
    """

    name: str
    where: str
    subset: str | None = None
    label: str | None = None
    prediction: str | None = None
    text: str | None = None
    openset: list[str] | None = None
    gold_openset: list[str] | None = None
    gold_reason: str | None = None


@dataclass
class ReferenceRow:
    """Gold information about one sample from a references file."""

    label: str | None = None
    subset: str | None = None
    openset: list[str] | None = None
    reason: str | None = None
    where: str = ""


@dataclass
class ScoreReport:
    """What :func:`score` computed: metrics, counts and the provenance to record with them."""

    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    unknown_predictions: dict[str, int] = field(default_factory=dict)
    missing_predictions: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (metrics sorted by name)."""
        return {
            "metrics": dict(sorted(self.metrics.items())),
            "counts": self.counts,
            "unknown_predictions": self.unknown_predictions,
            "missing_predictions": self.missing_predictions,
            **self.provenance,
        }


def _cell(row: dict[str, str], key: str) -> str | None:
    value = (row.get(key) or "").strip()
    return value or None


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with utf8_errors(path) as track, path.open(newline="", encoding="utf-8-sig") as handle:
        reader = track(csv.DictReader(handle))
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def detect_format(header: Sequence[str], path: Path) -> str:
    """The prediction format of a file with this header (see the module docstring)."""
    columns = set(header)
    if {"names", "chi_reasons"} <= columns or {"sample_id", "prediction", "target"} <= columns:
        return "emotion-llama"
    if {"name", "prediction"} <= columns:
        return "mosear"
    if {"name", "openset"} <= columns:
        return "openset"
    raise ValueError(
        f"{path}: cannot tell the prediction format from the header {list(header)}; expected "
        "'name,prediction,...' (mosear), 'names,chi_reasons' or 'sample_id,prediction,target' "
        "(emotion-llama), or 'name,openset'"
    )


def _subset(value: str | None, where: str) -> str | None:
    if value is not None and value not in SUBSETS:
        raise ValueError(f"{where}: field 'subset': {value!r} is not one of {', '.join(SUBSETS)}")
    return value


def _gold_label(value: str | None, space: LabelSpace, where: str, column: str) -> str | None:
    if value is None:
        return None
    label = space.normalise(value)
    if label is None:
        raise ValueError(
            f"{where}: field '{column}': gold label {value!r} is not in the {space.name} label "
            f"space ({', '.join(space.labels)}); choose another with --labels"
        )
    return label


def read_predictions(
    path: str | Path, fmt: str, space_hint: str | None
) -> tuple[str, LabelSpace, list[ScoredSample]]:
    """Read a prediction file; returns its format, the label space to use, and the samples.

    Args:
        path: The prediction CSV.
        fmt: One of :data:`FORMATS`.
        space_hint: ``--labels`` (a label-space name or comma-separated labels), or ``None``:
            then the ``score_<label>`` columns of a mosear file, else MER2023.
    """
    path = Path(path)
    header, rows = _read_csv(path)
    detected = detect_format(header, path)
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto" and fmt != detected:
        raise ValueError(f"{path}: header {header} is not the {fmt} format (looks like {detected})")
    score_labels = [c[len("score_") :] for c in header if c.startswith("score_")]
    space = _label_space(space_hint, score_labels)
    samples: list[ScoredSample] = []
    seen: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        if detected == "emotion-llama" and "chi_reasons" in header:
            name, sample = (
                _cell(row, "names"),
                ScoredSample("", where, text=_cell(row, "chi_reasons")),
            )
        elif detected == "emotion-llama":
            name = _cell(row, "sample_id")
            sample = ScoredSample(
                "",
                where,
                label=_gold_label(_cell(row, "target"), space, where, "target"),
                text=_cell(row, "prediction"),
            )
        elif detected == "mosear":
            name = _cell(row, "name")
            sample = ScoredSample(
                "",
                where,
                subset=_subset(_cell(row, "subset"), where),
                label=_gold_label(_cell(row, "label"), space, where, "label"),
                prediction=_cell(row, "prediction"),
                text=_cell(row, "text"),
            )
        else:
            name = _cell(row, "name")
            openset = read_openset_cell(row.get("openset") or "", where=where)
            sample = ScoredSample("", where, openset=openset)
        if name is None:
            raise ValueError(f"{where}: empty sample name")
        if name in seen:
            raise ValueError(f"{where}: sample {name!r} already appears at {seen[name]}")
        seen[name] = where
        sample.name = name
        samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no prediction rows")
    return detected, space, samples


def _label_space(hint: str | None, score_labels: Sequence[str]) -> LabelSpace:
    if hint:
        return get_label_space(hint.split(",") if "," in hint else hint)
    if score_labels:
        for space in LABEL_SPACES.values():
            if tuple(score_labels) == space.labels:
                return space
        return get_label_space(list(score_labels))
    return MER2023


def read_references(
    path: str | Path, space: LabelSpace, split: str | None
) -> dict[str, ReferenceRow]:
    """Gold information by sample id from a references CSV (see the module docstring).

    Rows of another split are skipped when the file has a ``split`` column and ``split`` is set.
    """
    path = Path(path)
    header, rows = _read_csv(path)
    name_col = next((c for c in _NAME_COLUMNS if c in header), None)
    if name_col is None:
        raise ValueError(f"{path}: no sample-id column (one of {', '.join(_NAME_COLUMNS)})")
    label_col = next((c for c in _LABEL_COLUMNS if c in header), None)
    reason_col = next((c for c in _REASON_COLUMNS if c in header), None)
    if label_col is None and reason_col is None and "openset" not in header:
        raise ValueError(
            f"{path}: no gold column; expected one of {', '.join(_LABEL_COLUMNS)}, openset, "
            f"{', '.join(_REASON_COLUMNS)}"
        )
    refs: dict[str, ReferenceRow] = {}
    for line, row in enumerate(rows, start=2):
        where = f"{path}, line {line}"
        if split and "split" in header and _cell(row, "split") not in (split, None):
            continue
        name = _cell(row, name_col)
        if name is None:
            raise ValueError(f"{where}: empty '{name_col}'")
        if name in refs:
            raise ValueError(f"{where}: sample {name!r} already appears at {refs[name].where}")
        refs[name] = ReferenceRow(
            label=_gold_label(_cell(row, label_col), space, where, label_col)
            if label_col
            else None,
            subset=_subset(_cell(row, "subset"), where) if "subset" in header else None,
            openset=read_openset_cell(row["openset"], where=where) if "openset" in header else None,
            reason=_cell(row, reason_col) if reason_col else None,
            where=where,
        )
    return refs


def _join(samples: list[ScoredSample], refs: dict[str, ReferenceRow]) -> int:
    """Fill gold fields from references; returns how many samples have no reference row."""
    unmatched = 0
    for sample in samples:
        ref = refs.get(sample.name)
        if ref is None:
            unmatched += 1
            continue
        for attr in ("label", "subset"):
            mine, theirs = getattr(sample, attr), getattr(ref, attr)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(
                    f"{sample.where}: {attr} {mine!r} of {sample.name} disagrees with "
                    f"{theirs!r} at {ref.where}"
                )
            if mine is None:
                setattr(sample, attr, theirs)
        sample.gold_openset = ref.openset if ref.openset else None
        sample.gold_reason = ref.reason
    return unmatched


def _predicted_index(
    sample: ScoredSample, space: LabelSpace, unknown: Counter, from_text: bool = False
) -> tuple[int, bool]:
    """Class index (``-1`` unparsed) and whether the prediction was an unknown label word.

    With ``from_text`` the generated text decides, wherever there is one (``--closed_from
    text``: the closed-set accuracy of the generated answers rather than of label scoring).
    """
    if from_text and sample.text is not None:
        index = text_to_label(sample.text, space)
        return (-1 if index is None else index), False
    if sample.prediction is not None:
        label = space.normalise(sample.prediction)
        if label is None:
            unknown[normalise_word(sample.prediction)] += 1
            return -1, True
        return space.labels.index(label), False
    if sample.text is not None:
        index = text_to_label(sample.text, space)
        return (-1 if index is None else index), False
    if sample.openset is not None:
        # A word list names a class only when its words map to exactly one label.
        labels = {space.normalise(w) for w in sample.openset} - {None}
        return (space.labels.index(labels.pop()) if len(labels) == 1 else -1), False
    return -1, False


def score(
    samples: list[ScoredSample],
    space: LabelSpace,
    *,
    vocabulary: EmotionVocabulary,
    extractor: EmotionExtractor,
    oov: str = "keep",
    prefix: str = "test/",
    bootstrap: int = DEFAULT_BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    closed_from: str = "prediction",
) -> ScoreReport:
    """Closed-set metrics for samples with a gold label, open-vocabulary ones for samples with
    gold emotion words (or a reference reasoning); see ``docs/evaluation.md``."""
    if closed_from not in ("prediction", "text"):
        raise ValueError(f"--closed_from must be 'prediction' or 'text', got {closed_from!r}")
    report = ScoreReport()
    unknown: Counter = Counter()
    from_text = closed_from == "text"

    closed = [s for s in samples if s.label is not None]
    if closed:
        # torch and torchmetrics (which imports transformers) load only here, so --help and
        # open-vocabulary-only scoring start in well under a second.
        import torch

        from src.metrics.closed_set import EmotionMetrics

        metric = EmotionMetrics(
            len(space), prefix=prefix, bootstrap_resamples=bootstrap, bootstrap_seed=seed
        )
        preds, flags = zip(
            *(_predicted_index(s, space, unknown, from_text) for s in closed), strict=True
        )
        target = [space.labels.index(s.label) for s in closed]
        subset_idx = [SUBSETS.index(s.subset) if s.subset else -1 for s in closed]
        metric.update(torch.tensor(preds), torch.tensor(target), torch.tensor(subset_idx))
        report.metrics.update({k: float(v) for k, v in metric.compute().items()})
        report.counts["closed_scored"] = len(closed)
        report.counts["closed_unparsed"] = sum(p < 0 for p in preds)
        report.counts["closed_unknown_label"] = sum(flags)
    report.unknown_predictions = dict(unknown.most_common())

    open_set = [s for s in samples if s.gold_openset is not None or s.gold_reason is not None]
    if open_set:
        need_pred = [s for s in open_set if s.openset is None and s.text is not None]
        need_gold = [s for s in open_set if s.gold_openset is None]
        extracted = extractor.extract_many(
            [s.text or "" for s in need_pred] + [s.gold_reason or "" for s in need_gold]
        )
        pred_words = {
            s.name: w for s, w in zip(need_pred, extracted[: len(need_pred)], strict=True)
        }
        gold_words = {
            s.name: w for s, w in zip(need_gold, extracted[len(need_pred) :], strict=True)
        }
        ov_samples = []
        for s in open_set:
            if s.openset is not None:
                pred = s.openset
            elif s.text is not None:
                pred = pred_words[s.name]
            elif s.prediction is not None and space.normalise(s.prediction) is not None:
                pred = [s.prediction]  # a closed-set answer is a one-word set
            else:
                pred = []
            gold = s.gold_openset if s.gold_openset is not None else gold_words[s.name]
            ov_samples.append(OpenVocabularySample(s.name, gold, pred, s.subset))
        metrics, counts = open_vocabulary_metrics(ov_samples, vocabulary, oov=oov, prefix=prefix)
        report.metrics.update(metrics)
        report.counts.update(counts)

    if not closed and not open_set:
        raise ValueError(
            "nothing to score: no sample has a gold label, gold emotion words or a reference "
            "reasoning; give --references"
        )
    report.counts["predictions"] = len(samples)
    report.provenance = {
        "label_space": {"name": space.name, "labels": list(space.labels)},
        "extractor": extractor.identity,
        "vocabulary": vocabulary.identity,
        "oov": oov,
        "closed_from": closed_from,
        "bootstrap": {"resamples": bootstrap, "seed": seed, "alpha": 0.05},
    }
    return report


def format_report(report: ScoreReport) -> str:
    """A plain-text table: metrics, then counts."""
    width = max((len(k) for k in (*report.metrics, *report.counts)), default=10) + 2
    lines = [f"{'metric':<{width}} value", "-" * (width + 10)]
    lines += [f"{k:<{width}} {v:.4f}" for k, v in sorted(report.metrics.items())]
    lines += ["-" * (width + 10)]
    lines += [f"{k:<{width}} {v}" for k, v in report.counts.items()]
    if report.unknown_predictions:
        shown = ", ".join(f"{w!r} x{n}" for w, n in list(report.unknown_predictions.items())[:10])
        lines.append(f"unknown predicted labels (unparsed): {shown}")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    """The ``score`` command's arguments."""
    parser = ArgumentParser(
        **STRICT_PARSER,
        prog="python -m src.cli score",
        description="Compute every applicable metric from a prediction file (ours, "
        "Emotion-LLaMA's or MER2024's), print a table and write JSON.",
    )
    parser.add_argument("--predictions", type=str, required=True, help="Prediction CSV.")
    parser.add_argument("--format", type=str, default="auto", help=f"One of {', '.join(FORMATS)}.")
    parser.add_argument(
        "--labels",
        type=str | None,
        default=None,
        help="Label space (mer2023, dfew, merr) or comma-separated labels; default: the "
        "score_ columns of a mosear file, else mer2023.",
    )
    parser.add_argument("--references", type=str | None, default=None, help="Gold CSV.")
    parser.add_argument(
        "--split", type=str | None, default="test", help="Split of references to use."
    )
    parser.add_argument("--output", type=str | None, default=None, help="Results JSON path.")
    parser.add_argument(
        "--vocabulary", type=str | None, default=None, help="Emotion vocabulary (format.csv)."
    )
    parser.add_argument(
        "--synonyms", type=str | None, default=None, help="JSON list of synonym groups."
    )
    parser.add_argument(
        "--oov", type=str, default="keep", help="Words outside the vocabulary: keep or drop."
    )
    parser.add_argument(
        "--closed_from",
        type=str,
        default="prediction",
        help="Closed-set prediction from the 'prediction' column (label scoring) or from the "
        "generated 'text'.",
    )
    parser.add_argument("--negation", type=bool, default=True, help="Rule-based negation.")
    parser.add_argument(
        "--judge", type=str | None, default=None, help="Local HF causal LM directory as judge."
    )
    parser.add_argument(
        "--judge_cache",
        type=str | None,
        default=None,
        help="Judge cache JSON; default: judge_cache.json beside --output.",
    )
    parser.add_argument("--judge_max_new_tokens", type=int, default=32)
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=DEFAULT_BOOTSTRAP_RESAMPLES,
        help="Bootstrap resamples for subset/gap intervals (0: none).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    parser.add_argument("--prefix", type=str, default="test/", help="Metric name prefix.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``score``; returns 0 on success and 2 on bad input (the message names the file)."""
    args = build_parser().parse_args(argv)
    try:
        if args.output and Path(args.output).is_dir():
            raise InvalidInputError(
                f"--output {args.output} is a directory; give the JSON file to write"
            )
        fmt, space, samples = read_predictions(args.predictions, args.format, args.labels)
        unmatched = len(samples)
        refs: dict[str, ReferenceRow] = {}
        if args.references:
            refs = read_references(args.references, space, args.split)
            unmatched = _join(samples, refs)
        vocabulary = EmotionVocabulary.load(args.vocabulary, args.synonyms)
        extractor: EmotionExtractor
        if args.judge:
            cache = args.judge_cache
            if cache is None and args.output:
                cache = str(Path(args.output).with_name("judge_cache.json"))
            extractor = LocalLMJudgeExtractor(
                args.judge, cache_path=cache, max_new_tokens=args.judge_max_new_tokens
            )
        else:
            extractor = RuleBasedExtractor(vocabulary, negation=args.negation)
        report = score(
            samples,
            space,
            vocabulary=vocabulary,
            extractor=extractor,
            oov=args.oov,
            prefix=args.prefix,
            bootstrap=args.bootstrap,
            seed=args.seed,
            closed_from=args.closed_from,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"score: error: {err}", file=sys.stderr)
        return 2
    names = {s.name for s in samples}
    report.missing_predictions = sorted(n for n in refs if n not in names)
    if refs:
        report.counts["without_reference"] = unmatched
        report.counts["missing_predictions"] = len(report.missing_predictions)
    report.provenance["inputs"] = {
        "predictions": str(args.predictions),
        "format": fmt,
        "references": args.references,
        "split": args.split if args.references else None,
    }
    print(format_report(report))
    if report.missing_predictions:
        print(
            f"warning: {len(report.missing_predictions)} reference samples have no prediction "
            "(listed in the JSON)",
            file=sys.stderr,
        )
    if args.output:
        with atomic_open(args.output) as handle:
            json.dump(report.to_json(), handle, indent=2, allow_nan=False)
            handle.write("\n")
        print(f"results written to {args.output}")
    return 0
