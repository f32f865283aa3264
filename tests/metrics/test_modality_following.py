"""Followed audio / followed visual on conflict samples: counts, metric names, the bar plot."""

import pytest
import torch

from src.callbacks.results_table import format_results_table
from src.core.records import SUBSETS
from src.metrics.modality_following import ModalityFollowing


def test_counts_which_label_the_prediction_followed_on_conflict_samples():
    metric = ModalityFollowing(SUBSETS, prefix="test/")
    va, aa, co = (SUBSETS.index(s) for s in ("video_aligned", "audio_aligned", "consistent"))
    # preds, audio label, video label, subset
    rows = [
        (1, 1, 2, va),  # video_aligned, followed audio
        (2, 1, 2, va),  # followed visual
        (0, 1, 2, va),  # neither
        (3, 3, 4, aa),  # audio_aligned, followed audio
        (3, 3, 3, co),  # consistent: not a conflict sample
        (1, -1, 2, aa),  # unannotated: left out
    ]
    preds, audio, video, subset = (torch.tensor(c) for c in zip(*rows, strict=True))
    metric.update(preds, audio, video, subset)
    values = {k: float(v) for k, v in metric.compute().items()}
    assert values == pytest.approx(
        {
            "test/video_aligned/followed_audio": 1 / 3,
            "test/video_aligned/followed_visual": 1 / 3,
            "test/audio_aligned/followed_audio": 1.0,
            "test/audio_aligned/followed_visual": 0.0,
            "test/conflict/followed_audio": 2 / 4,
            "test/conflict/followed_visual": 1 / 4,
        }
    )
    figure = metric.figure()
    (ax,) = figure.axes
    heights = sorted(round(p.get_height(), 1) for p in ax.patches)
    assert heights == sorted([33.3, 100.0, 50.0, 33.3, 0.0, 25.0])
    table = format_results_table({k: v for k, v in values.items()}, "test")
    assert "followed        audio  50.0 %, visual  25.0 %" in table
