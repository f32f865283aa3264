"""DDP on 2 CPU processes (ddp_spawn): the same test metrics as 1 process, one MLflow run."""

from pathlib import Path

import mlflow
import pytest
from lightning.pytorch.callbacks import Callback

from src.cli import main
from src.tracking.artifacts import mlflow_logger
from tests.conftest import TINY_CONFIG


class RunIdProbe(Callback):
    """Writes ``<rank> <MLflow run id>`` from every rank when testing starts.

    Args:
        folder: Where each rank writes its file.
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_test_start(self, trainer, pl_module) -> None:
        run_id = mlflow_logger(trainer).run_id
        Path(self.folder, f"rank{trainer.global_rank}.txt").write_text(str(run_id))


# An odd test split: the evaluation sampler must not pad ranks with repeated samples.
ODD = ["--data.init_args.synthetic.n_test", "35"]


@pytest.mark.slow
def test_two_processes_give_the_same_test_metrics_as_one(workdir):
    cli = main(["fit", "--config", str(TINY_CONFIG), *ODD, "--test_after_fit", "false"])
    best = cli.trainer.checkpoint_callback.best_model_path
    one = main(["test", "--config", str(TINY_CONFIG), *ODD, "--ckpt_path", best])
    two = main(
        [
            "test",
            "--config",
            str(TINY_CONFIG),
            *ODD,
            "--ckpt_path",
            best,
            "--trainer.strategy",
            "ddp_spawn",
            "--trainer.devices",
            "2",
            "--trainer.callbacks+=tests.test_ddp.RunIdProbe",
            "--trainer.callbacks.init_args.folder",
            str(workdir),
        ]
    )
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
    # Every rank knows the run id, and it is the run rank zero logged to.
    ids = {(workdir / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert ids == {logged["run_id"]}


@pytest.mark.slow
def test_ddp_subprocess_launcher_every_rank_knows_the_run_id(workdir):
    """`strategy: ddp` restarts the command line in a second process (as torchrun would): that
    process builds its own logger, and learns rank zero's run id by broadcast."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.cli",
            "test",
            "--config",
            str(TINY_CONFIG),
            "--trainer.strategy",
            "ddp",
            "--trainer.devices",
            "2",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks+=tests.test_ddp.RunIdProbe",
            "--trainer.callbacks.init_args.folder",
            str(workdir),
            "--allow_untrained",  # the run ids are checked here, not the metrics
            "true",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tests"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    ids = {(workdir / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert ids == {runs.iloc[0]["run_id"]}
