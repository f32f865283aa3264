"""Closed-set metrics against scikit-learn, torchmetrics and plain numpy on random inputs."""

import os
import tempfile

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassRecall

from src.core.records import SUBSETS
from src.metrics.closed_set import (
    EmotionMetrics,
    bootstrap_ci,
    confusion_matrix_figure,
    fold_summary,
    subset_indices,
)


def _random_batch(seed: int, n: int, c: int, unparsed: bool = True, absent: int = 0):
    g = torch.Generator().manual_seed(seed)
    low = -1 if unparsed else 0
    preds = torch.randint(low, c, (n,), generator=g)
    target = torch.randint(0, c - absent, (n,), generator=g)
    # Make the predictions better than chance so that metrics are not all near 1/C.
    hit = torch.rand(n, generator=g) < 0.4
    preds = torch.where(hit, target, preds)
    subsets = torch.randint(-1, len(SUBSETS), (n,), generator=g)
    return preds, target, subsets


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("absent", [0, 2])
def test_matches_sklearn_on_random_inputs(seed, absent):
    c = 6
    preds, target, subsets = _random_batch(seed, 300, c, absent=absent)
    metric = EmotionMetrics(c, prefix="test/")
    for chunk in range(3):  # several updates, like batches
        sl = slice(chunk * 100, (chunk + 1) * 100)
        metric.update(preds[sl], target[sl], subsets[sl])
    out = {k: float(v) for k, v in metric.compute().items()}

    y, p = target.numpy(), preds.numpy()
    assert out["test/acc"] == pytest.approx(accuracy_score(y, p))
    assert out["test/war"] == pytest.approx(accuracy_score(y, p))
    expected_f1 = f1_score(y, p, labels=list(range(c)), average="weighted", zero_division=0)
    assert out["test/f1_weighted"] == pytest.approx(expected_f1)
    with pytest.warns(UserWarning):  # sklearn notes the -1 "class" absent from y_true
        assert out["test/uar"] == pytest.approx(balanced_accuracy_score(y, p))
    assert out["test/unparsed_rate"] == pytest.approx(float(np.mean(p == -1)))

    s = subsets.numpy()
    for i, name in enumerate(SUBSETS):
        mask = s == i
        assert out[f"test/{name}/acc"] == pytest.approx(accuracy_score(y[mask], p[mask]))
        expected = f1_score(
            y[mask], p[mask], labels=list(range(c)), average="weighted", zero_division=0
        )
        assert out[f"test/{name}/f1_weighted"] == pytest.approx(expected)
    gap = accuracy_score(y[s == 1], p[s == 1]) - accuracy_score(y[s == 0], p[s == 0])
    assert SUBSETS[:2] == ("video_aligned", "audio_aligned")
    assert out["test/modality_gap"] == pytest.approx(gap)


@pytest.mark.parametrize("seed", range(3))
def test_matches_torchmetrics_when_nothing_is_unparsed(seed):
    c = 7
    preds, target, _ = _random_batch(seed, 400, c, unparsed=False)
    ours = EmotionMetrics(c)
    ours.update(preds, target)
    out = ours.compute()
    assert set(target.tolist()) == set(range(c))  # all classes present: macro averages agree
    acc = MulticlassAccuracy(c, average="micro")(preds, target)
    f1 = MulticlassF1Score(c, average="weighted")(preds, target)
    uar = MulticlassRecall(c, average="macro")(preds, target)
    torch.testing.assert_close(out["acc"], acc)
    torch.testing.assert_close(out["f1_weighted"], f1)
    torch.testing.assert_close(out["uar"], uar)


def test_empty_subsets_are_omitted_and_nothing_is_nan():
    metric = EmotionMetrics(3, prefix="val/")
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert metric.compute() == {}
    preds = torch.tensor([0, 1, -1, 2])
    target = torch.tensor([0, 1, 2, 2])
    metric.update(preds, target, torch.tensor([-1, 0, 0, -1]))  # video_aligned only
    out = metric.compute()
    assert "val/video_aligned/acc" in out
    assert not any(k.startswith(("val/audio_aligned", "val/consistent")) for k in out)
    assert "val/modality_gap" not in out
    assert all(torch.isfinite(v) for v in out.values())
    assert float(out["val/video_aligned/acc"]) == pytest.approx(0.5)


def test_unlabelled_targets_are_skipped_and_bad_values_raise():
    metric = EmotionMetrics(3)
    metric.update(torch.tensor([0, 1, 2]), torch.tensor([0, -1, 1]))
    assert float(metric.compute()["acc"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="preds"):
        metric.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="target"):
        metric.update(torch.tensor([0]), torch.tensor([-2]))
    with pytest.raises(ValueError, match="subset"):
        metric.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([3]))
    with pytest.raises(ValueError, match="same length"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0]))


def test_merging_two_states_equals_one_metric_over_the_union():
    c = 6
    preds, target, subsets = _random_batch(11, 250, c)
    whole = EmotionMetrics(c, bootstrap_resamples=200)
    whole.update(preds, target, subsets)
    left, right = EmotionMetrics(c, bootstrap_resamples=200), EmotionMetrics(c)
    left.update(preds[:97], target[:97], subsets[:97])
    right.update(preds[97:], target[97:], subsets[97:])
    left.merge_state(right)  # uses dist_reduce_fx, like a DDP sync
    expected, merged = whole.compute(), left.compute()
    assert expected.keys() == merged.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key])


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    preds, target, subsets = _random_batch(5, 120, 5)
    metric = EmotionMetrics(5, prefix="test/")
    metric.update(preds[rank::world], target[rank::world], subsets[rank::world])
    out = {k: float(v) for k, v in metric.compute().items()}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_with_two_processes(tmp_path):
    init_file = tempfile.mktemp(dir=tmp_path)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, init_file, str(tmp_path)), nprocs=2)
    preds, target, subsets = _random_batch(5, 120, 5)
    single = EmotionMetrics(5, prefix="test/")
    single.update(preds, target, subsets)
    expected = {k: float(v) for k, v in single.compute().items()}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got == pytest.approx(expected)


def test_bootstrap_is_deterministic_and_seed_dependent():
    counts = {"video_aligned": (40, 100), "audio_aligned": (70, 100), "consistent": (80, 120)}
    a = bootstrap_ci(counts, n_resamples=2000, seed=3)
    b = bootstrap_ci(counts, n_resamples=2000, seed=3)
    c = bootstrap_ci(counts, n_resamples=2000, seed=4)
    assert a == b
    assert a != c
    assert set(a) == {*counts, "modality_gap"}
    for name, (correct, total) in counts.items():
        low, high = a[name]
        assert low < correct / total < high
    low, high = a["modality_gap"]
    assert low < 0.3 < high
    # A subset's interval does not depend on which other subsets are present.
    alone = bootstrap_ci({"consistent": (80, 120)}, n_resamples=2000, seed=3)
    assert alone["consistent"] == a["consistent"]
    assert "modality_gap" not in alone


def test_bootstrap_matches_resampling_per_sample():
    rng = np.random.default_rng(0)
    video = rng.random(150) < 0.45
    audio = rng.random(120) < 0.7
    resamples = 20_000
    naive_v = np.array([rng.choice(video, video.size).mean() for _ in range(resamples)])
    naive_a = np.array([rng.choice(audio, audio.size).mean() for _ in range(resamples)])
    naive_gap = np.quantile(naive_a - naive_v, [0.025, 0.975])
    fast = bootstrap_ci(
        {"video_aligned": (int(video.sum()), video.size), "audio_aligned": (int(audio.sum()), 120)},
        n_resamples=resamples,
    )
    assert fast["video_aligned"] == pytest.approx(np.quantile(naive_v, [0.025, 0.975]), abs=0.01)
    assert fast["modality_gap"] == pytest.approx(naive_gap, abs=0.015)


def test_compute_adds_intervals_under_the_metric_names():
    preds, target, subsets = _random_batch(2, 200, 4)
    metric = EmotionMetrics(4, prefix="test/", bootstrap_resamples=500)
    metric.update(preds, target, subsets)
    out = metric.compute()
    for name in SUBSETS:
        assert out[f"test/{name}/acc_ci_low"] <= out[f"test/{name}/acc"]
        assert out[f"test/{name}/acc"] <= out[f"test/{name}/acc_ci_high"]
    assert out["test/modality_gap_ci_low"] < out["test/modality_gap_ci_high"]


def test_confusion_matrix_figures():
    metric = EmotionMetrics(3, prefix="test/")
    with pytest.raises(RuntimeError):
        metric.confusion_matrix()
    metric.update(
        torch.tensor([0, -1, 2, 1]), torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 1, -1])
    )
    metric.compute()
    cm = metric.confusion_matrix()
    assert cm.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]]
    figures = metric.figures(["a", "b", "c"])
    assert set(figures) == {
        "confusion_test_all.png",
        "confusion_test_video_aligned.png",
        "confusion_test_audio_aligned.png",
    }
    fig = figures["confusion_test_all.png"]
    assert isinstance(fig, Figure)
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["a", "b", "c", "(unparsed)"]
    no_unparsed = confusion_matrix_figure(np.eye(3, 4, dtype=int), ["a", "b", "c"])
    assert len(no_unparsed.axes[0].get_xticklabels()) == 3
    with pytest.raises(ValueError, match="does not fit"):
        confusion_matrix_figure(np.eye(2), ["a", "b", "c"])


def test_fold_summary_matches_numpy():
    rng = np.random.default_rng(1)
    folds = [{"test/uar": float(u), "test/war": float(w)} for u, w in rng.random((5, 2))]
    folds[2]["test/extra"] = 1.0
    out = fold_summary(folds)
    uar = np.array([f["test/uar"] for f in folds])
    assert out["folds"] == 5
    assert out["test/uar_mean"] == pytest.approx(uar.mean())
    assert out["test/uar_std"] == pytest.approx(np.std(uar, ddof=1))
    assert "test/extra_mean" not in out
    assert "test/war_std" not in fold_summary(folds[:1])
    with pytest.raises(ValueError):
        fold_summary([])


def test_subset_indices():
    assert subset_indices(["consistent", None, "video_aligned", ""]).tolist() == [2, -1, 0, -1]
    with pytest.raises(ValueError, match="unknown subset 'both'"):
        subset_indices(["both"])
