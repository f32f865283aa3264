"""`compare`: grouping MLflow runs the test creates, mean/std, CSV, Markdown, PNG, own run."""

import statistics

import mlflow
import pandas as pd
import pytest

from src.cli import main
from tests.fault_injection import expect_user_error


@pytest.fixture
def store(workdir):
    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    (workdir / "mlruns").mkdir()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("ablation")
    values = {"lora": [0.30, 0.40, 0.35], "mosear": [0.50, 0.60, 0.55]}
    for method, accs in values.items():
        for seed, acc in enumerate(accs):
            with mlflow.start_run(tags={"method": method, "seed": str(seed)}):
                mlflow.log_params({"seed": seed})
                mlflow.log_metrics({"test/video_aligned/acc": acc, "test/modality_gap": 0.5 - acc})
    with mlflow.start_run(tags={"method": "broken"}) as run:  # not FINISHED: must be ignored
        mlflow.log_metric("test/video_aligned/acc", 1.0)
    mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")
    return uri, values


def test_groups_runs_with_mean_and_spread(store, workdir):
    uri, values = store
    metrics = ["test/video_aligned/acc", "test/modality_gap"]
    code = main(
        [
            "compare",
            "--tracking_uri",
            uri,
            "--experiments",
            "[ablation]",
            "--metrics",
            str(metrics),
            "--output",
            "cmp",
            "--log_run",
            "true",
        ]
    )
    assert code == 0
    table = pd.read_csv(workdir / "cmp" / "comparison.csv")
    assert list(table["tags.method"]) == ["lora", "mosear"]
    for method, accs in values.items():
        row = table[table["tags.method"] == method].iloc[0]
        assert row["n"] == 3
        assert row["test/video_aligned/acc mean"] == pytest.approx(statistics.mean(accs))
        assert row["test/video_aligned/acc std"] == pytest.approx(statistics.stdev(accs))
    markdown = (workdir / "cmp" / "comparison.md").read_text()
    assert "| mosear | 3 | 55.00 ± 5.00 |" in markdown
    assert (workdir / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    mlflow.set_tracking_uri(uri)
    logged = mlflow.search_runs(experiment_names=["comparisons"])
    assert len(logged) == 1


def test_filters_and_tags_select_runs(store, workdir):
    uri, _ = store
    code = main(
        [
            "compare",
            "--tracking_uri",
            uri,
            "--experiments",
            "[ablation]",
            "--tags",
            "{method: lora}",
            "--filter",
            "params.seed != '2'",
            "--metrics",
            "[test/video_aligned/acc]",
            "--output",
            "cmp",
        ]
    )
    assert code == 0
    table = pd.read_csv(workdir / "cmp" / "comparison.csv")
    assert table["n"].tolist() == [2]
    assert table["test/video_aligned/acc mean"].iloc[0] == pytest.approx(0.35)


def test_unknown_experiment_or_metric_is_a_clear_error(store, capsys):
    uri, _ = store
    line = expect_user_error(capsys, ["compare", "--tracking_uri", uri, "--experiments", "[nope]"])
    assert "--experiments: no MLflow experiment named ['nope']" in line
    line = expect_user_error(
        capsys,
        [
            "compare",
            "--tracking_uri",
            uri,
            "--experiments",
            "[ablation]",
            "--metrics",
            "[test/missing]",
        ],
    )
    assert "--metrics: metric(s) ['test/missing'] were not logged" in line
