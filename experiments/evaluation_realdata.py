"""Numbers quoted in docs/evaluation.md, measured on the real files of $MOSEAR_REALDATA.

    MOSEAR_REALDATA=../shared/realdata .venv/bin/python experiments/evaluation_realdata.py

1. MER2024 open-vocabulary set metrics of ``predict-openset.csv`` against ``check-openset.csv``
   with format.csv grouping (both out-of-vocabulary policies);
2. the rule-based extractor on EMER-V1's 100 written reasonings: how often the extracted
   emotion words contain the sample's gold label, and how often ``text_to_label`` recovers it;
3. the cost of the closed-set metrics with 10,000 bootstrap resamples on 100,000 samples.
"""

import csv
import os
import sys
import time
from pathlib import Path

import torch

from src.core.label_space import MER2023
from src.metrics.closed_set import EmotionMetrics
from src.metrics.emotion_vocabulary import EmotionVocabulary
from src.metrics.open_vocabulary import (
    OpenVocabularySample,
    RuleBasedExtractor,
    group_words,
    open_vocabulary_metrics,
    read_openset_cell,
    text_to_label,
)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def main() -> int:
    root = os.environ.get("MOSEAR_REALDATA")
    if not root:
        print("set MOSEAR_REALDATA to the real-data folder", file=sys.stderr)
        return 2
    ov = Path(root) / "open-vocabulary"
    vocab = EmotionVocabulary.from_format_csv(ov / "format.csv")
    gold = {
        r["name"]: read_openset_cell(r["openset"], where="gold")
        for r in _rows(ov / "check-openset.csv")
    }
    pred = {
        r["name"]: read_openset_cell(r["openset"], where="pred")
        for r in _rows(ov / "predict-openset.csv")
    }
    samples = [OpenVocabularySample(n, gold[n], pred.get(n, [])) for n in gold]
    print("1. MER2024 set metrics (format.csv grouping)")
    for oov in ("keep", "drop"):
        metrics, counts = open_vocabulary_metrics(samples, vocab, oov=oov)
        print(
            f"   oov={oov}: acc {metrics['test/ov_acc']:.4f} "
            f"recall {metrics['test/ov_recall']:.4f} mean {metrics['test/ov_mean']:.4f} "
            f"unparsed {metrics['test/ov_unparsed_rate']:.4f} "
            f"scored {counts['ov_scored']}"
        )

    print("2. Rule-based extraction on EMER-V1 reasonings (gold label recovered)")
    emer = _rows(Path(root) / "emer" / "gt-eng.csv")
    for name, vocabulary in (("format.csv", vocab), ("builtin", EmotionVocabulary.default())):
        for scope in ("auto", "all"):
            extractor = RuleBasedExtractor(vocabulary, scope=scope)
            hits = labels = words = 0
            for row in emer:
                found = extractor.extract(row["reasons"])
                words += len(found)
                gold_label = MER2023.normalise(row["emotions"])
                hits += any(MER2023.normalise(w) == gold_label for w in found) or bool(
                    group_words(found, vocabulary) & {vocabulary.group(row["emotions"])}
                )
                index = text_to_label(row["reasons"], MER2023, scope=scope)
                labels += index is not None and MER2023.labels[index] == gold_label
            print(
                f"   {name:<10} scope={scope:<4}: label among words {hits}/{len(emer)}, "
                f"text_to_label right {labels}/{len(emer)}, {words / len(emer):.2f} words/text"
            )

    print("3. Closed-set metrics, 100,000 samples, 10,000 bootstrap resamples")
    g = torch.Generator().manual_seed(0)
    metric = EmotionMetrics(6, prefix="test/", bootstrap_resamples=10_000)
    start = time.perf_counter()
    for _ in range(100):
        metric.update(
            torch.randint(-1, 6, (1000,), generator=g),
            torch.randint(0, 6, (1000,), generator=g),
            torch.randint(-1, 3, (1000,), generator=g),
        )
    updated = time.perf_counter()
    metric.compute()
    done = time.perf_counter()
    print(
        f"   100 updates {1000 * (updated - start):.1f} ms, "
        f"compute {1000 * (done - updated):.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
