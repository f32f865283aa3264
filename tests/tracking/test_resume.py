"""Resuming: `fit --ckpt_path last` continues an interrupted run (even one killed with SIGKILL)
into the same MLflow run, and ends with the metrics of an uninterrupted run."""

import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from jsonargparse import Namespace

from src.cli import main
from src.core.errors import MissingInputError
from src.io.checkpoint_io import (
    SafeCheckpointIO,
    find_last_checkpoint,
    load_checkpoint_safely,
)
from src.tracking.mlflow_logger import MoSEARMLFlowLogger
from src.tracking.resume import resolve_config_checkpoint, resume_logging
from tests.fault_injection import SMALL, cli, expect_user_error, finish, tiny_config

HANG = {
    "class_path": "tests.fault_injection.HangAt",
    "init_args": {"epoch": 2, "batch": 1},
}
SIGTERM_AT = {
    "class_path": "tests.fault_injection.HangAt",
    "init_args": {
        "epoch": 1,
        "batch": 1,
        "env": "MOSEAR_TEST_SIGTERM_MARKER",
        "until_sigterm": True,
    },
}
STEPS_PER_EPOCH = 3  # 48 training samples, batch size 16


def store(workdir: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")


def only_run(workdir: Path):
    client = store(workdir)
    (experiment,) = [e for e in client.search_experiments() if e.name == "tests"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the fit ended before reaching the kill point:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the fit did not reach the kill point in time")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    configs = {}
    for folder in (killed, whole):
        folder.mkdir()
        configs[folder] = tiny_config(
            folder, trainer={"max_epochs": 4, "deterministic": True}, callbacks=[HANG]
        )
    marker = killed / "hang.marker"
    victim = cli(
        killed, "fit", "--config", str(configs[killed]), MOSEAR_TEST_HANG_MARKER=str(marker)
    )
    reference = cli(whole, "fit", "--config", str(configs[whole]))
    try:
        wait_for(marker, victim)
        # Killed in the middle of epoch 2: the last checkpoint is the end of epoch 1.
        last = find_last_checkpoint(killed / "outputs")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    except BaseException:
        reference.kill()
        raise
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    assert int(marker.read_text()) == 2 * STEPS_PER_EPOCH + 1
    checkpoint = load_checkpoint_safely(last)
    assert checkpoint["global_step"] == 2 * STEPS_PER_EPOCH
    run_id = checkpoint["mlflow_run_id"]
    assert only_run(killed).info.status == "RUNNING"  # killed: nobody closed it

    out = finish(cli(killed, "fit", "--config", str(configs[killed]), "--ckpt_path", "last"))
    # Lightning's "Restored all states" is quiet by default; the CLI says which state it resumes.
    assert f"{last.name} (epoch 1, global step {2 * STEPS_PER_EPOCH}); Lightning restores" in out
    finish(reference)
    resumed, uninterrupted = only_run(killed), only_run(whole)
    assert resumed.info.run_id == run_id and resumed.info.status == "FINISHED"
    assert uninterrupted.info.status == "FINISHED"
    assert load_checkpoint_safely(last)["global_step"] == 4 * STEPS_PER_EPOCH

    def test_metrics(run) -> dict[str, float]:
        return {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}

    assert test_metrics(resumed) and test_metrics(resumed) == test_metrics(uninterrupted)

    def history(workdir: Path, run, key: str) -> dict[int, float]:
        return {m.step: m.value for m in store(workdir).get_metric_history(run.info.run_id, key)}

    # Every epoch's validation, before and after the kill, is in the one run and matches.
    val = history(killed, resumed, "val/acc")
    assert len(val) == 4 and val == history(whole, uninterrupted, "val/acc")


@pytest.mark.slow
def test_resuming_a_finished_run_continues_in_a_new_run_and_leaves_it_alone(workdir):
    config = tiny_config(workdir, trainer={"max_epochs": 1}, data={"synthetic": SMALL})
    first = main(["fit", "--config", str(config), "--test_after_fit", "false"])
    run_id = first.trainer.logger.run_id
    assert only_run(workdir).info.status == "FINISHED"
    last = find_last_checkpoint(workdir / "outputs")
    assert load_checkpoint_safely(last)["mlflow_run_id"] == run_id

    with pytest.warns(UserWarning, match="FINISHED and is never reopened"):
        second = main(
            ["fit", "--config", str(config), "--trainer.max_epochs", "2", "--ckpt_path", "last"]
        )
    assert second.trainer.global_step == 2  # epoch 0 was not trained again
    new_id = second.trainer.logger.run_id
    assert new_id != run_id
    client = store(workdir)
    old, new = client.get_run(run_id), client.get_run(new_id)
    assert old.info.status == "FINISHED" and "test/acc" not in old.data.metrics
    assert len(client.get_metric_history(run_id, "val/acc")) == 1  # untouched
    assert new.info.status == "FINISHED" and "test/acc" in new.data.metrics
    assert new.data.tags["mosear.resumed_from_run"] == run_id


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_last_resumes_this_experiment(workdir):
    """Pre-empted mid-epoch (SIGTERM) -> a resumable last.ckpt and a non-zero exit; then
    another experiment B trains in the same default_root_dir (its last.ckpt is newer); A is
    resumed with `--ckpt_path last` after its data folder moved: A's checkpoint, A's run
    (reopened, ends FINISHED, no metric point twice, the moved path recorded), B untouched."""
    a = tiny_config(workdir, trainer={"max_epochs": 2}, callbacks=[SIGTERM_AT], name="a.yaml")
    b = tiny_config(
        workdir,
        data={"synthetic": SMALL, "root": "data/b"},
        logger={"experiment_name": "b"},
        name="b.yaml",
    )
    marker = workdir / "sigterm.marker"
    victim = cli(workdir, "fit", "--config", str(a), MOSEAR_TEST_SIGTERM_MARKER=str(marker))
    wait_for(marker, victim)
    victim.send_signal(signal.SIGTERM)
    out, _ = victim.communicate(timeout=120)
    assert victim.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM at global step 5" in out
    a_last = find_last_checkpoint(workdir / "outputs")
    assert load_checkpoint_safely(a_last)["global_step"] == STEPS_PER_EPOCH + 2  # mid-epoch
    a_run = load_checkpoint_safely(a_last)["mlflow_run_id"]
    assert store(workdir).get_run(a_run).info.status != "RUNNING"  # not left open

    other = main(["fit", "--config", str(b)])
    b_run = other.trainer.logger.run_id
    assert find_last_checkpoint(workdir / "outputs") != a_last  # B's is the newest

    def points(run_id: str) -> dict[str, list[tuple[int, float]]]:
        client = store(workdir)
        keys = client.get_run(run_id).data.metrics
        return {
            k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
        }

    interrupted = points(a_run)
    (workdir / "data" / "camer_tiny").rename(workdir / "data" / "moved")
    resumed = main(
        ["fit", "--config", str(a), "--data.init_args.root", "data/moved", "--ckpt_path", "last"]
    )
    assert resumed.trainer.logger.run_id == a_run
    assert resumed.trainer.global_step == 2 * STEPS_PER_EPOCH
    client = store(workdir)
    run = client.get_run(a_run)
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics
    # The run's params are the flattened config; the moved root is recorded as a tag.
    assert run.data.tags["mosear.resumed.data.init_args.root"] == "data/moved"
    assert run.data.params["data.init_args.root"] != "data/moved"
    # The resumed process added no point at a step the interrupted one had already logged.
    after = points(a_run)
    for key, logged in interrupted.items():
        last = max(step for step, _ in logged)
        assert [p for p in after[key] if p[0] <= last] == logged, key
    assert max(step for step, _ in after["train/loss"]) > max(
        s for s, _ in interrupted["train/loss"]
    )
    assert len(client.get_metric_history(a_run, "val/acc")) == 2
    b_after = client.get_run(b_run)
    assert b_after.info.status == "FINISHED"
    assert len(client.get_metric_history(b_run, "test/acc")) == 1


def test_last_without_any_checkpoint_is_a_clear_error(workdir, capsys):
    config = tiny_config(workdir)
    line = expect_user_error(capsys, ["fit", "--config", str(config), "--ckpt_path", "last"])
    assert "no last.ckpt under trainer.default_root_dir" in line
    line = expect_user_error(
        capsys, ["test", "--config", str(config), "--ckpt_path", "nowhere.ckpt"]
    )
    assert "checkpoint not found: nowhere.ckpt" in line


def test_last_is_the_newest_last_checkpoint_under_the_root(tmp_path):
    older = tmp_path / "1" / "run_a" / "checkpoints" / "last.ckpt"
    newer = tmp_path / "1" / "run_b" / "checkpoints" / "last-v1.ckpt"
    other = tmp_path / "1" / "run_b" / "checkpoints" / "epoch=3-step=12.ckpt"
    for i, path in enumerate((older, newer, other)):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"i": i}, path)
        os.utime(path, (1000 + i, 1000 + i))
    assert find_last_checkpoint(tmp_path) == newer
    os.utime(older, (5000, 5000))
    assert find_last_checkpoint(tmp_path) == older


def test_last_is_the_newest_checkpoint_of_this_experiment_only(tmp_path):
    mine = {"experiment": "a", "config": "1234"}
    paths = {}
    for i, identity in enumerate(
        [mine, {"experiment": "b", "config": "1234"}, {"experiment": "a", "config": "9999"}, None]
    ):
        path = tmp_path / "1" / f"run_{i}" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({"mosear_identity": identity} if identity else {"state_dict": {}}, path)
        os.utime(path, (1000 + i, 1000 + i))  # the others are all newer than mine
        paths[i] = path
    assert find_last_checkpoint(tmp_path) == paths[3]
    assert find_last_checkpoint(tmp_path, mine) == paths[0]
    with pytest.raises(MissingInputError, match="none of the 4 last checkpoint"):
        find_last_checkpoint(tmp_path, {"experiment": "c", "config": "1234"})


def test_checkpoint_names_the_run_that_a_resumed_fit_logs_into(workdir):
    logger = MoSEARMLFlowLogger(experiment_name="tests", save_dir="mlruns")
    client = store(workdir)
    experiment = client.get_experiment_by_name("tests").experiment_id
    old = client.create_run(experiment)
    client.set_terminated(old.info.run_id, "FAILED")  # e.g. stopped by a NaN loss
    path = workdir / "outputs" / experiment / old.info.run_id / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "mlflow_run_id": old.info.run_id}, path)
    config = Namespace(
        subcommand="fit",
        fit=Namespace(ckpt_path="last", trainer=Namespace(default_root_dir="outputs")),
    )
    assert resolve_config_checkpoint(config) == old.info.run_id
    assert config.fit.ckpt_path == str(path.relative_to(workdir))
    trainer = L.Trainer(logger=logger, default_root_dir="outputs", enable_progress_bar=False)
    resume_logging(trainer, old.info.run_id)
    assert logger.run_id == old.info.run_id
    assert client.get_run(old.info.run_id).info.status == "RUNNING"
    # A checkpoint whose run the store does not have: a warning and a new, tagged run.
    elsewhere = f"sqlite:///{workdir / 'elsewhere.db'}"
    other = MoSEARMLFlowLogger(experiment_name="tests", tracking_uri=elsewhere)
    trainer = L.Trainer(logger=other, default_root_dir="outputs", enable_progress_bar=False)
    with pytest.warns(UserWarning, match="does not have"):
        resume_logging(trainer, old.info.run_id)
    assert other.run_id != old.info.run_id
    tags = other.experiment.get_run(other.run_id).data.tags
    assert tags["mosear.resumed_from_run"] == old.info.run_id


def test_the_cli_installs_safe_checkpoint_io(workdir):
    config = str(tiny_config(workdir))
    cli = main(
        ["fit", "--config", config, "--trainer.max_epochs", "0", "--test_after_fit", "false"]
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, SafeCheckpointIO)
