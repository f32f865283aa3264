"""Closed-set emotion metrics, overall and per CA-MER subset, from one torchmetrics state.

The only state is a stack of confusion matrices, ``(1 + n_subsets, C, C + 1)`` counts summed
across processes (``dist_reduce_fx="sum"``): slice 0 holds every labelled sample, slice
``1 + s`` the samples of subset ``s``; the extra last column counts *unparsed* predictions
(``-1``: generated text that named no label). Every metric is a function of these counts, so
merging two states is exact, and an unparsed prediction is always wrong without being mapped to
any class. torchmetrics' own ``Multiclass*`` metrics cannot hold such a prediction (they would
need it to be a class), which is why the counts live here; the tests check the results against
scikit-learn and, when nothing is unparsed, against ``MulticlassAccuracy``/``F1Score``/``Recall``.

Definitions (``docs/evaluation.md``): acc = WAR = trace / N; f1_weighted = sum over classes of
F1_c * support_c / N (MER2023's official metric); uar = mean recall over classes that occur in the
targets (DFEW); modality_gap = acc(audio_aligned) - acc(video_aligned).

Where the data set knows its Bayes-optimal accuracies (synthetic worlds, :meth:`EmotionMetrics.
set_bayes`): ``bayes/acc``, ``bayes/<subset>/acc``, ``bayes/modality_gap`` (and the same under
``bayes_train_prior/``), ``excess_gap`` = modality_gap - bayes/modality_gap (the part of the gap
a better model could remove) and ``acc_shortfall`` = bayes/acc - acc.
"""

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import Metric

from src.core.records import SUBSETS
from src.metrics.defaults import DEFAULT_BOOTSTRAP_RESAMPLES


def subset_indices(
    subsets: Sequence[str | None], device: torch.device | str | None = None
) -> Tensor:
    """Map a batch's ``subsets`` list to indices into :data:`SUBSETS` (``-1`` for none).

    Raises ``ValueError`` naming the subset when it is not one of :data:`SUBSETS`.
    """
    out = []
    for subset in subsets:
        if subset is None or subset == "":
            out.append(-1)
        elif subset in SUBSETS:
            out.append(SUBSETS.index(subset))
        else:
            raise ValueError(f"unknown subset {subset!r}; expected one of {', '.join(SUBSETS)}")
    return torch.tensor(out, dtype=torch.long, device=device)


def scores_from_confusion(confmat: Tensor) -> dict[str, float] | None:
    """acc, f1_weighted, uar, war and unparsed_rate of one ``(C, C + 1)`` count matrix.

    Returns ``None`` when the matrix holds no sample. A class with no prediction has precision
    0, a class with no target has recall 0 (scikit-learn's ``zero_division=0``); UAR averages
    recall over the classes present in the targets only.
    """
    cm = confmat.detach().to("cpu", torch.float64)
    num_classes = cm.shape[0]
    total = cm.sum()
    if total == 0:
        return None
    tp = torch.diagonal(cm[:, :num_classes])
    support = cm.sum(dim=1)
    predicted = cm[:, :num_classes].sum(dim=0)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), denom)
    acc = float(tp.sum() / total)
    present = support > 0
    return {
        "acc": acc,
        "f1_weighted": float((f1 * support).sum() / total),
        "uar": float(recall[present].mean()),
        "war": acc,
        "unparsed_rate": float(cm[:, num_classes].sum() / total),
    }


def bootstrap_ci(
    counts: Mapping[str, tuple[int, int]],
    n_resamples: int = DEFAULT_BOOTSTRAP_RESAMPLES,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals for subset accuracies and the modality gap.

    Each subset is resampled on its own (a stratified bootstrap: the subsets are disjoint sets
    of clips of fixed size). Resampling ``n`` per-sample 0/1 correctness values with
    replacement and taking the mean is, in distribution, exactly ``Binomial(n, k/n) / n``;
    drawing that binomial directly gives the same bootstrap distribution at no memory cost. The
    gap's replicate ``b`` is ``acc_audio_aligned[b] - acc_video_aligned[b]``.

    Args:
        counts: Subset name -> ``(correct, total)``; subsets with ``total == 0`` are skipped.
        n_resamples: Bootstrap replicates (default 10,000).
        alpha: 1 - confidence level (0.05 gives a 95% interval).
        seed: Seed; subset ``s`` draws from ``numpy.random.default_rng([seed, i])`` where ``i``
            is its position in :data:`SUBSETS` (or in ``counts`` for other names), so one
            subset's interval does not depend on which other subsets are present.

    Returns:
        Subset name (and ``"modality_gap"`` when both aligned subsets exist) -> ``(low, high)``.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    replicates: dict[str, np.ndarray] = {}
    names = list(counts)
    for name, (correct, total) in counts.items():
        if total <= 0:
            continue
        if not 0 <= correct <= total:
            raise ValueError(f"subset {name}: correct={correct} is not within [0, {total}]")
        stream = SUBSETS.index(name) if name in SUBSETS else len(SUBSETS) + names.index(name)
        rng = np.random.default_rng([seed, stream])
        replicates[name] = rng.binomial(total, correct / total, size=n_resamples) / total
    if "audio_aligned" in replicates and "video_aligned" in replicates:
        replicates["modality_gap"] = replicates["audio_aligned"] - replicates["video_aligned"]
    q = (alpha / 2, 1 - alpha / 2)
    return {
        name: tuple(float(v) for v in np.quantile(values, q)) for name, values in replicates.items()
    }


class EmotionMetrics(Metric):
    """Accuracy, weighted F1, UAR/WAR, per-subset accuracy and the modality gap.

    ``compute()`` returns ``{prefix}acc``, ``f1_weighted``, ``uar``, ``war``, ``unparsed_rate``;
    for every subset with samples ``{prefix}<subset>/acc`` and ``/f1_weighted``; when both
    aligned subsets have samples ``{prefix}modality_gap``; with ``bootstrap_resamples > 0`` also
    ``{prefix}<subset>/acc_ci_low``/``_ci_high`` and ``{prefix}modality_gap_ci_low``/``_ci_high``.
    Keys of empty subsets are omitted (never NaN); with no sample at all the dict is empty.

    Args:
        num_classes: Size of the label space.
        subsets: Subset names; ``subset_idx`` in :meth:`update` indexes this tuple.
        prefix: Prepended to every key (``"val/"``, ``"test/"``).
        bootstrap_resamples: Replicates for the subset/gap intervals; 0 disables them.
        bootstrap_seed: Seed of the bootstrap (see :func:`bootstrap_ci`).
        alpha: 1 - confidence level of the intervals.
        **kwargs: Passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ...).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        subsets: Sequence[str] = SUBSETS,
        prefix: str = "",
        bootstrap_resamples: int = 0,
        bootstrap_seed: int = 0,
        alpha: float = 0.05,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.subsets = tuple(subsets)
        self.prefix = prefix
        self.bootstrap_resamples = int(bootstrap_resamples)
        self.bootstrap_seed = int(bootstrap_seed)
        self.alpha = float(alpha)
        shape = (len(self.subsets) + 1, self.num_classes, self.num_classes + 1)
        self.add_state(
            "confmat", default=torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum"
        )
        self.last_confusion: Tensor | None = None
        self.bayes: dict[str, Any] | None = None

    def set_bayes(self, bounds: Mapping[str, Any] | None) -> None:
        """Bayes bounds of the evaluated split (``acc``, ``<subset>/acc``, ``modality_gap``,
        ``train_prior/...`` and ``counts``: samples per subset they were computed on), or
        ``None``. :meth:`compute` reports them and the excess over them when its own per-subset
        counts equal ``counts`` (the bounds hold for exactly these samples); otherwise it warns
        and leaves them out."""
        self.bayes = dict(bounds) if bounds is not None else None

    def _bayes_metrics(self, out: dict[str, float], counts: dict[str, tuple[int, int]]) -> None:
        assert self.bayes is not None
        p = self.prefix
        seen = {name: total for name, (_, total) in counts.items()}
        expected = {k: int(v) for k, v in self.bayes.get("counts", {}).items()}
        if seen != expected:
            warnings.warn(
                f"{p}bayes: the Bayes bounds hold for {expected} samples per subset but "
                f"{seen} were evaluated (a limited or filtered split); bounds not reported",
                stacklevel=3,
            )
            return
        for key, value in self.bayes.items():
            if key == "counts":
                continue
            head, _, rest = key.partition("train_prior/")
            name = f"{p}bayes_train_prior/{rest}" if not head and rest else f"{p}bayes/{key}"
            out[name] = float(value)
        if f"{p}modality_gap" in out and f"{p}bayes/modality_gap" in out:
            out[f"{p}excess_gap"] = out[f"{p}modality_gap"] - out[f"{p}bayes/modality_gap"]
        out[f"{p}acc_shortfall"] = out[f"{p}bayes/acc"] - out[f"{p}acc"]

    def update(self, preds: Tensor, target: Tensor, subset_idx: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            preds: ``(B,)`` predicted class indices; ``-1`` marks an unparsed prediction.
            target: ``(B,)`` true class indices; ``-1`` (unlabelled) samples are skipped.
            subset_idx: ``(B,)`` index into ``subsets`` or ``-1`` for a sample of no subset
                (such samples only count overall); ``None`` means no subsets in this batch.
        """
        preds, target = preds.reshape(-1).long(), target.reshape(-1).long()
        if subset_idx is None:
            subset_idx = torch.full_like(target, -1)
        subset_idx = subset_idx.reshape(-1).long().to(target.device)
        preds = preds.to(target.device)
        if not preds.shape == target.shape == subset_idx.shape:
            raise ValueError(
                f"preds {tuple(preds.shape)}, target {tuple(target.shape)} and subset_idx "
                f"{tuple(subset_idx.shape)} must have the same length"
            )
        c, s = self.num_classes, len(self.subsets)
        for name, values, high in (
            ("preds", preds, c),
            ("target", target, c),
            ("subset", subset_idx, s),
        ):
            if values.numel() and (values.min() < -1 or values.max() >= high):
                raise ValueError(
                    f"{name} values must be in [-1, {high - 1}], got {values.tolist()}"
                )
        keep = target >= 0
        preds, target, subset_idx = preds[keep], target[keep], subset_idx[keep]
        column = torch.where(preds < 0, torch.full_like(preds, c), preds)
        cell = target * (c + 1) + column
        in_subset = subset_idx >= 0
        flat = torch.cat([cell, (subset_idx[in_subset] + 1) * c * (c + 1) + cell[in_subset]])
        counts = torch.bincount(flat, minlength=self.confmat.numel())
        # Out of place: under ddp_spawn on CPU the initial state tensor is shared memory between
        # the worker processes, and an in-place add would count every rank's samples twice.
        self.confmat = self.confmat + counts.view_as(self.confmat)

    def compute(self) -> dict[str, Tensor]:
        """The metrics described in the class docstring (scalar CPU tensors)."""
        # compute() runs on the synced state; keep it for confusion_matrix_figure().
        self.last_confusion = self.confmat.detach().cpu().clone()
        overall = scores_from_confusion(self.confmat[0])
        if overall is None:
            return {}
        p = self.prefix
        out = {f"{p}{k}": v for k, v in overall.items()}
        counts: dict[str, tuple[int, int]] = {}
        for i, name in enumerate(self.subsets):
            cm = self.confmat[i + 1]
            scores = scores_from_confusion(cm)
            if scores is None:
                continue
            out[f"{p}{name}/acc"] = scores["acc"]
            out[f"{p}{name}/f1_weighted"] = scores["f1_weighted"]
            counts[name] = (int(torch.diagonal(cm[:, : self.num_classes]).sum()), int(cm.sum()))
        if f"{p}audio_aligned/acc" in out and f"{p}video_aligned/acc" in out:
            out[f"{p}modality_gap"] = out[f"{p}audio_aligned/acc"] - out[f"{p}video_aligned/acc"]
        if self.bayes is not None:
            self._bayes_metrics(out, counts)
        if self.bootstrap_resamples > 0 and counts:
            intervals = bootstrap_ci(
                counts, self.bootstrap_resamples, self.alpha, self.bootstrap_seed
            )
            for name, (low, high) in intervals.items():
                key = f"{p}modality_gap" if name == "modality_gap" else f"{p}{name}/acc"
                out[f"{key}_ci_low"], out[f"{key}_ci_high"] = low, high
        return {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}

    def confusion_matrix(self, subset: str | None = None) -> Tensor:
        """``(C, C + 1)`` counts (last column: unparsed) from the last :meth:`compute`."""
        if self.last_confusion is None:
            raise RuntimeError("call compute() first: the confusion matrix is the synced state")
        if subset is None:
            return self.last_confusion[0]
        return self.last_confusion[self.subsets.index(subset) + 1]

    def figures(self, label_names: Sequence[str]) -> dict[str, Figure]:
        """Confusion-matrix figures of the last :meth:`compute`: ``confusion_<part>.png``.

        ``<part>`` is ``all`` or a subset with samples; the prefix's split is kept in the
        name (``confusion_test_all.png``) so one MLflow run can hold val and test plots.
        """
        split = self.prefix.strip("/").replace("/", "_")
        stem = f"confusion_{split}_" if split else "confusion_"
        out = {}
        for part in (None, *self.subsets):
            cm = self.confusion_matrix(part)
            if int(cm.sum()) == 0:
                continue
            title = f"{self.prefix}{part or 'all'}"
            out[f"{stem}{part or 'all'}.png"] = confusion_matrix_figure(cm, label_names, title)
        return out


def confusion_matrix_figure(
    confmat: Tensor | np.ndarray, label_names: Sequence[str], title: str = ""
) -> Figure:
    """A row-normalised confusion matrix (colour = recall share) annotated with counts.

    Args:
        confmat: ``(C, C)`` or ``(C, C + 1)`` counts, rows = true class; a ``C + 1``-th column
            (unparsed predictions) is drawn only when it is non-zero.
        label_names: The ``C`` class names.
        title: Figure title.
    """
    cm = np.asarray(confmat.cpu() if isinstance(confmat, Tensor) else confmat, dtype=np.int64)
    c = len(label_names)
    if cm.shape not in ((c, c), (c, c + 1)):
        raise ValueError(f"confusion matrix of shape {cm.shape} does not fit {c} labels")
    columns = list(label_names)
    if cm.shape[1] == c + 1:
        if cm[:, c].sum() == 0:
            cm = cm[:, :c]
        else:
            columns.append("(unparsed)")
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    # Figure() without pyplot: no global backend state, safe in worker processes.
    fig = Figure(figsize=(1.0 + 0.75 * len(columns), 1.0 + 0.7 * c), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(c), list(label_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of true class")
    return fig


def fold_summary(per_fold: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and standard deviation over folds (DFEW's five-fold protocol).

    For every key present in all folds, ``<key>_mean`` and ``<key>_std`` (sample standard
    deviation, ``ddof=1``; omitted for a single fold); plus ``folds``, the number of folds.
    Keys missing from some fold are not summarised (a partial mean would mislead).
    """
    if not per_fold:
        raise ValueError("fold_summary needs at least one fold")
    keys = set(per_fold[0]).intersection(*per_fold[1:])
    out: dict[str, float] = {"folds": float(len(per_fold))}
    for key in sorted(keys):
        values = np.array([float(fold[key]) for fold in per_fold], dtype=np.float64)
        out[f"{key}_mean"] = float(values.mean())
        if len(values) > 1:
            out[f"{key}_std"] = float(values.std(ddof=1))
    return out
