"""DDP on 2 CPU processes (ddp_spawn): the same test metrics as 1 process, one MLflow run."""

import mlflow
import pytest

from src.cli import main
from tests.conftest import TINY_CONFIG

# An odd test split: the evaluation sampler must not pad ranks with repeated samples.
ODD = ["--data.init_args.synthetic.n_test", "35"]


@pytest.mark.slow
def test_two_processes_give_the_same_test_metrics_as_one(workdir):
    cli = main(["fit", "--config", str(TINY_CONFIG), *ODD, "--test_after_fit", "false"])
    best = cli.trainer.checkpoint_callback.best_model_path
    one = main(["test", "--config", str(TINY_CONFIG), *ODD, "--ckpt_path", best])
    two = main([
        "test", "--config", str(TINY_CONFIG), *ODD, "--ckpt_path", best,
        "--trainer.strategy", "ddp_spawn", "--trainer.devices", "2",
    ])  # fmt: skip
    m1 = {k: float(v) for k, v in one.trainer.callback_metrics.items() if k.startswith("test/")}
    m2 = {k: float(v) for k, v in two.trainer.callback_metrics.items() if k.startswith("test/")}
    assert "test/modality_gap" in m1 and m1.keys() == m2.keys()
    assert m1 == pytest.approx(m2, abs=1e-6)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tests"])
    # fit, 1-process test, 2-process test: one run each, all finished, rank zero logged once.
    assert len(runs) == 3 and set(runs["status"]) == {"FINISHED"}
    logged = runs.sort_values("start_time").iloc[-1]
    assert logged["metrics.test/acc"] == pytest.approx(m2["test/acc"], abs=1e-6)
