"""Prints the per-subset results table after testing."""

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from src.core.records import SUBSETS


def format_results_table(metrics: dict[str, float], prefix: str = "test") -> str:
    """A plain-text table of overall and per-subset metrics (missing entries shown as '-').

    With Bayes bounds (synthetic worlds) a ``Bayes %`` column and the excess gap and accuracy
    shortfall; without them a line saying the data set has none.
    """

    def cell(key: str) -> str:
        value = metrics.get(f"{prefix}/{key}")
        return "-" if value is None else f"{100 * float(value):6.2f}"

    bayes = f"{prefix}/bayes/acc" in metrics
    rows = [("overall", cell("acc"), cell("f1_weighted"), cell("bayes/acc"))]
    rows += [(s, cell(f"{s}/acc"), "", cell(f"bayes/{s}/acc")) for s in SUBSETS]
    width = 39 if bayes else 31
    head = f"{'subset':<15} {'acc %':>7} {'wF1 %':>7}" + (f" {'Bayes %':>7}" if bayes else "")
    lines = [head, "-" * width]
    for name, acc, f1, bound in rows:
        lines.append(f"{name:<15} {acc:>7} {f1:>7}" + (f" {bound:>7}" if bayes else ""))
    lines.append("-" * width)
    gap_bound = f" {'':>7} {cell('bayes/modality_gap'):>7}" if bayes else ""
    lines.append(
        f"{'modality_gap':<15} {cell('modality_gap'):>7}{gap_bound}   "
        "(audio_aligned - video_aligned)"
    )
    if bayes:
        lines.append(f"{'excess_gap':<15} {cell('excess_gap'):>7}   (gap - Bayes gap)")
        lines.append(f"{'acc_shortfall':<15} {cell('acc_shortfall'):>7}   (Bayes acc - acc)")
    else:
        lines.append("Bayes bounds: none for this data set (only synthetic worlds know them)")
    audio, visual = (metrics.get(f"{prefix}/conflict/followed_{m}") for m in ("audio", "visual"))
    if audio is not None and visual is not None:
        lines.append(
            f"{'followed':<15} audio {100 * audio:5.1f} %, visual {100 * visual:5.1f} %  "
            "(conflict samples)"
        )
    # With AR: the attention share of each modality before and after reallocation.
    for modality in ("audio", "visual", "text"):
        before = metrics.get(f"{prefix}/attn_share_before/{modality}")
        after = metrics.get(f"{prefix}/attn_share/{modality}")
        if before is not None and after is not None:
            lines.append(
                f"attn share {modality:<6} {100 * before:5.1f} -> {100 * after:5.1f} %  (AR)"
            )
    return "\n".join(lines)


class ResultsTable(Callback):
    """At the end of ``test``: print the CA-MER table.

    The CLI defers the printing (:func:`deferred_results_tables`) and prints the table after the
    test has finished (:func:`print_results_tables`), so that it is the last thing on the
    console, followed only by where the MLflow run is.

    Args:
        prefix: Metric namespace to read (``test``).
    """

    def __init__(self, prefix: str = "test") -> None:
        self.prefix = prefix
        self.defer = False
        self.text: str | None = None

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)
        }
        self.text = format_results_table(metrics, self.prefix)
        if not self.defer:
            self.print()

    def print(self) -> None:
        """Print the last table (once)."""
        if self.text is not None:
            print("\n" + self.text)
            self.text = None


def deferred_results_tables(trainer: L.Trainer) -> None:
    """Make the trainer's :class:`ResultsTable` callbacks keep their table until
    :func:`print_results_tables`."""
    for callback in trainer.callbacks:
        if isinstance(callback, ResultsTable):
            callback.defer = True


def print_results_tables(trainer: L.Trainer) -> None:
    """Print the tables the trainer's :class:`ResultsTable` callbacks kept."""
    for callback in trainer.callbacks:
        if isinstance(callback, ResultsTable):
            callback.print()
