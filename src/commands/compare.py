"""``python -m src.cli compare``: a table and a bar chart of MLflow runs grouped by a parameter."""

import os
from pathlib import Path

from jsonargparse import ArgumentParser

from src.core.errors import STRICT_PARSER
from src.io.atomic import atomic_open

# MLflow and pandas load in main(), so ``compare --help`` starts in a fraction of a second.

#: Metrics compared when --metrics is not given.
DEFAULT_METRICS: tuple[str, ...] = (
    "test/video_aligned/acc",
    "test/audio_aligned/acc",
    "test/consistent/acc",
    "test/modality_gap",
    "test/acc",
)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(**STRICT_PARSER, prog="python -m src.cli compare", description=__doc__)
    parser.add_argument(
        "--tracking_uri",
        type=str | None,
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns sqlite)",
    )
    parser.add_argument("--experiments", type=list[str], default=["mosear"])
    parser.add_argument("--filter", type=str, default="", help="MLflow search filter string")
    parser.add_argument("--tags", type=dict[str, str], default={}, help="exact tag values")
    parser.add_argument(
        "--group_by",
        type=str,
        default="tags.method",
        help="search_runs column to group by (tags.X or params.X)",
    )
    parser.add_argument("--metrics", type=list[str], default=list(DEFAULT_METRICS))
    parser.add_argument(
        "--per_model",
        type=bool,
        default=True,
        help="count each trained model once per group (test/predict runs of one checkpoint "
        "name their fit run in tags.source_run); false: every run is a sample",
    )
    parser.add_argument(
        "--output",
        type=str,
        default="outputs/compare",
        help="folder for comparison.csv, comparison.md and comparison.png",
    )
    parser.add_argument(
        "--log_run",
        type=bool,
        default=False,
        help="also log the comparison as its own MLflow run (experiment 'comparisons')",
    )
    return parser


def main(argv: list[str]) -> int:
    cfg = build_parser().parse_args(argv)  # --help exits here, before MLflow loads
    import mlflow

    from src.tracking.backend_check import DEFAULT_MLFLOW_DIR, default_tracking_uri
    from src.tracking.compare import bar_chart, one_per_model, select_runs, summarize, to_markdown

    uri = (
        cfg.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(DEFAULT_MLFLOW_DIR)
    )
    frame = select_runs(uri, cfg.experiments, cfg.filter, cfg.tags)
    if frame.empty:
        print(
            f"no finished runs match in {uri} "
            f"(experiments {cfg.experiments}, filter {cfg.filter!r})"
        )
        return 1
    if cfg.per_model:
        frame = one_per_model(frame, cfg.metrics, cfg.group_by)
    summary = summarize(frame, cfg.metrics, cfg.group_by)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "comparison.csv", "w", newline="") as f:
        summary.to_csv(f, index=False)
    markdown = to_markdown(summary, cfg.metrics, cfg.group_by)
    with atomic_open(out / "comparison.md", "w") as f:
        f.write(markdown)
    chart = bar_chart(summary, cfg.metrics, cfg.group_by, out / "comparison.png")
    print(markdown)
    print(f"{len(frame)} run(s); wrote {out / 'comparison.csv'}, {out / 'comparison.md'}, {chart}")
    if cfg.log_run:
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("comparisons")
        with mlflow.start_run(run_name=f"compare by {cfg.group_by}") as run:
            mlflow.log_params(
                {
                    "experiments": ",".join(cfg.experiments),
                    "filter": cfg.filter,
                    "group_by": cfg.group_by,
                    "n_runs": len(frame),
                }
            )
            for path in (out / "comparison.csv", out / "comparison.md", chart):
                mlflow.log_artifact(str(path))
        print(f"logged the comparison as MLflow run {run.info.run_id} (experiment 'comparisons')")
    return 0
