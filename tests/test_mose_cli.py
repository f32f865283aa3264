"""MoSE through the real CLI: fast_dev_run, reload to identical metrics, 2-process ddp_spawn."""

import mlflow
import pytest
import torch

from src.cli import main
from tests.conftest import REPO, TINY_CONFIG

MOSE = str(REPO / "tests/conf/mose.yaml")
DOMINANCE = ["--model.init_args.adapter.init_args.modality_weighting", "dominance"]


def test_fast_dev_run_fit(workdir):
    cli = main(
        ["fit", "--config", str(TINY_CONFIG), "--config", MOSE, "--trainer.fast_dev_run", "true"]
    )
    assert cli.trainer.state.finished
    experts = [p for n, p in cli.model.named_parameters() if ".experts." in n]
    assert experts and any(p.abs().sum() > 0 for p in experts), "one step must move the zero B's"


def test_checkpoint_reloads_to_identical_test_metrics(workdir):
    cli = main(["fit", "--config", str(TINY_CONFIG), "--config", MOSE, *DOMINANCE])
    first = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")}
    best = cli.trainer.checkpoint_callback.best_model_path
    state = torch.load(best, weights_only=True)["state_dict"]
    assert any("modality_weights" in k for k in state), "dominance weights must be saved"
    again = main(["test", "--config", str(TINY_CONFIG), "--config", MOSE, *DOMINANCE,
                  "--ckpt_path", best])  # fmt: skip
    second = {
        k: float(v) for k, v in again.trainer.callback_metrics.items() if k.startswith("test/")
    }
    assert first and first == pytest.approx(second, abs=1e-6)


@pytest.mark.slow
def test_two_process_ddp_spawn_fit(workdir):
    cli = main([
        "fit", "--config", str(TINY_CONFIG), "--config", MOSE,
        "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2",
    ])  # fmt: skip
    assert cli.trainer.state.finished
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tests"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    assert runs.iloc[0]["metrics.train/gate_loss"] == runs.iloc[0]["metrics.train/gate_loss"]
    assert "metrics.test/modality_gap" in runs.columns
