"""MoSEAR through the real CLI: MoSE trains in fit, AR acts in test, shares and plot in MLflow."""

import mlflow

from src.cli import main
from tests.conftest import REPO, TINY_CONFIG

MOSE = str(REPO / "tests/conf/mose.yaml")
AR = [
    "--trainer.callbacks+=src.callbacks.attention_reallocation.AttentionReallocation",
    "--trainer.callbacks.init_args",
    "{reallocator: {class_path: src.models.attention.strategies.Reweight,"
    " init_args: {multipliers: {audio: 0.5}}}}",
]


def test_fit_with_mose_then_test_with_ar(workdir, capsys):
    cli = main(["fit", "--config", str(TINY_CONFIG), "--config", MOSE, *AR])
    assert "attn share audio" in capsys.readouterr().out  # the printed table shows AR's effect
    metrics = cli.trainer.callback_metrics
    # AR was active in the test after fit, never during fit (no val/ or train/ shares).
    before, after = (
        float(metrics["test/attn_share_before/audio"]),
        float(metrics["test/attn_share/audio"]),
    )
    assert 0.0 < before < 1.0 and after != before
    assert not any(k.startswith(("val/attn_share", "train/attn_share")) for k in metrics)
    assert cli.model.model.language_model.config._attn_implementation == "sdpa"
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["tests"]).iloc[0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id)}
    assert {"attention_share.png", "expert_usage.png", "config.yaml"} <= artifacts, artifacts
    assert run["metrics.train/gate_loss"] == run["metrics.train/gate_loss"]


def test_default_config_is_mosear(workdir, capsys):
    import pytest
    import yaml

    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    method = yaml.safe_load(capsys.readouterr().out)["method"]
    assert method["adapter"]["class_path"].endswith("MoSEAdapter")
    assert any("attention_reallocation" in str(c) for c in method["callbacks"])
