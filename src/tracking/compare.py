"""Comparing MLflow runs: select, group by a parameter or tag, mean and spread over seeds."""

import math
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd

from src.core.errors import InvalidInputError
from src.io.atomic import atomic_open


def select_runs(
    tracking_uri: str,
    experiments: Sequence[str],
    filter_string: str = "",
    tags: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Finished runs of ``experiments`` matching an MLflow filter string and exact tag values."""
    clauses = [filter_string] if filter_string else []
    clauses += [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    clauses.append("attributes.status = 'FINISHED'")
    mlflow.set_tracking_uri(tracking_uri)
    known = [e for e in experiments if mlflow.get_experiment_by_name(e) is not None]
    missing = sorted(set(experiments) - set(known))
    if missing:
        raise InvalidInputError(
            f"--experiments: no MLflow experiment named {missing} in {tracking_uri}"
        )
    return mlflow.search_runs(
        experiment_names=list(known),
        filter_string=" and ".join(clauses),
        output_format="pandas",
    )


SOURCE_RUN = "tags.source_run"


def one_per_model(frame: pd.DataFrame, metrics: Sequence[str], group_by: str) -> pd.DataFrame:
    """One row per trained model in each group: a test or predict run of a checkpoint names
    the fit run it came from (``tags.source_run``), and evaluations of one model in one group
    are one sample (the newest is kept), not extra seeds. Runs that logged none of ``metrics``
    (a predict run) are left out."""
    columns = [f"metrics.{m}" for m in metrics if f"metrics.{m}" in frame.columns]
    if columns:
        frame = frame[frame[columns].notna().any(axis=1)]
    model = frame["run_id"]
    if SOURCE_RUN in frame.columns:
        model = frame[SOURCE_RUN].where(frame[SOURCE_RUN].notna() & (frame[SOURCE_RUN] != ""))
        model = model.fillna(frame["run_id"])
    frame = frame.assign(_model=model).sort_values("start_time")
    keys = [group_by, "_model"] if group_by in frame.columns else ["_model"]
    return frame.drop_duplicates(keys, keep="last").drop(columns="_model")


def summarize(frame: pd.DataFrame, metrics: Sequence[str], group_by: str) -> pd.DataFrame:
    """One row per group: ``<metric> mean``, ``<metric> std`` (sample std, 0 for one run), ``n``.

    ``group_by`` is a column of :func:`mlflow.search_runs` output (``tags.method``,
    ``params.model.init_args.adapter.class_path``, ...). Runs lacking a metric are left out of
    that metric's statistics (and counted in ``n`` only where present).
    """
    if group_by not in frame.columns:
        have = sorted(c for c in frame.columns if c.startswith(("tags.", "params.")))
        raise InvalidInputError(
            f"--group_by: no column {group_by!r} in the selected runs; have {have[:20]}"
        )
    columns = [f"metrics.{m}" for m in metrics]
    absent = [m for m, c in zip(metrics, columns, strict=True) if c not in frame.columns]
    if absent:
        raise InvalidInputError(
            f"--metrics: metric(s) {absent} were not logged by any selected run"
        )
    rows = []
    for group, part in frame.groupby(group_by, sort=True):
        row: dict[str, object] = {group_by: group, "n": len(part)}
        for metric, column in zip(metrics, columns, strict=True):
            values = part[column].dropna()
            row[f"{metric} mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{metric} std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(
    summary: pd.DataFrame, metrics: Sequence[str], group_by: str, scale: float = 100.0
) -> str:
    """A Markdown table: one row per group, ``mean ± std`` per metric (in percent by default)."""
    header = [group_by.split(".", 1)[-1], "n", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [str(row[group_by]), str(int(row["n"]))]
        for m in metrics:
            mean, std = row[f"{m} mean"], row[f"{m} std"]
            cells.append("-" if math.isnan(mean) else f"{scale * mean:.2f} ± {scale * std:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: pd.DataFrame, metrics: Sequence[str], group_by: str, path: Path) -> Path:
    """Grouped bar chart (metrics on x, one bar per group, std as error bars) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary[group_by])
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(metrics), 4))
    for i, (_, row) in enumerate(summary.iterrows()):
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(metrics))]
        means = [100 * row[f"{m} mean"] for m in metrics]
        stds = [100 * row[f"{m} std"] for m in metrics]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=str(row[group_by]))
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([m.split("/", 1)[-1] for m in metrics], rotation=20, ha="right")
    ax.set_ylabel("%")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(title=group_by.split(".", 1)[-1], fontsize=8)
    ax.set_title("Run comparison (mean ± std over runs)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=130, format="png")
    plt.close(fig)
    return path
