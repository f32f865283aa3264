"""Which modality the prediction followed on conflict samples (audio vs visual), DDP-synced.

On a conflict sample the audio stream shows ``audio_label`` and the visual stream
``video_label`` (they differ). The fraction of conflict samples whose prediction equals
``audio_label`` ("followed audio") vs ``video_label`` ("followed visual") shows the bias
directly: an audio-biased model follows audio on both conflict subsets.
"""

from collections.abc import Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics import Metric

#: Conflict subsets, in the order of the ``subset_ids`` the collator builds (see SUBSETS).
CONFLICT_SUBSETS = ("video_aligned", "audio_aligned")


class ModalityFollowing(Metric):
    """Counts per conflict subset: samples, predictions = audio label, = visual label.

    Args:
        subsets: All subset names in ``subset_ids`` order.
        prefix: Metric name prefix (``test/``).
    """

    full_state_update = False

    def __init__(self, subsets: Sequence[str], prefix: str = "test/") -> None:
        super().__init__()
        self.subsets = tuple(subsets)
        self.prefix = prefix
        self.conflict = [self.subsets.index(s) for s in CONFLICT_SUBSETS if s in self.subsets]
        n = len(self.conflict)
        for name in ("total", "audio", "visual"):
            self.add_state(name, torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self, preds: Tensor, audio_labels: Tensor, video_labels: Tensor, subset_ids: Tensor
    ) -> None:
        """Add a batch: ``(B,)`` predicted class, audio/visual label (``-1`` unknown), subset."""
        known = (audio_labels >= 0) & (video_labels >= 0) & (audio_labels != video_labels)
        for slot, subset in enumerate(self.conflict):
            mask = known & (subset_ids == subset)
            self.total[slot] += mask.sum()
            self.audio[slot] += (mask & (preds == audio_labels)).sum()
            self.visual[slot] += (mask & (preds == video_labels)).sum()

    def compute(self) -> dict[str, Tensor]:
        """``<prefix><subset>/followed_{audio,visual}`` and ``<prefix>conflict/followed_...``
        (fractions of that subset's conflict samples); subsets without samples are left out."""
        out = {}
        parts = [(self.subsets[s], slot) for slot, s in enumerate(self.conflict)]
        for name, index in [*parts, ("conflict", None)]:
            total = self.total.sum() if index is None else self.total[index]
            if int(total) == 0:
                continue
            for side, counts in (("audio", self.audio), ("visual", self.visual)):
                hits = counts.sum() if index is None else counts[index]
                out[f"{self.prefix}{name}/followed_{side}"] = hits.float() / total.float()
        return out

    def figure(self) -> Figure | None:
        """Grouped bars: followed audio / followed visual per conflict subset and overall."""
        values = {k: float(v) for k, v in self.compute().items()}
        names = [
            n
            for n in (*CONFLICT_SUBSETS, "conflict")
            if f"{self.prefix}{n}/followed_audio" in values
        ]
        if not names:
            return None
        fig = Figure(figsize=(1.6 * len(names) + 2.2, 3.4), layout="constrained")
        ax = fig.subplots()
        width = 0.38
        for offset, side, colour in (
            (-width / 2, "audio", "#d95f02"),
            (width / 2, "visual", "#1b9e77"),
        ):
            heights = [100 * values[f"{self.prefix}{n}/followed_{side}"] for n in names]
            xs = [i + offset for i in range(len(names))]
            bars = ax.bar(xs, heights, width, label=f"followed {side}", color=colour)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(["all conflict" if n == "conflict" else n for n in names])
        ax.set_ylabel("% of conflict samples")
        ax.set_ylim(0, 105)
        ax.legend(fontsize=8)
        ax.set_title("Prediction = audio label or visual label (conflict samples)")
        return fig
