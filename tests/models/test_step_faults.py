"""A NaN loss or an out-of-memory error stops the fit with a message naming the step and the
batch; the last good checkpoint stays on disk and loads; the MLflow run is marked FAILED."""

import mlflow
import pytest
import torch

from src.cli import main
from src.io.checkpoint_io import find_last_checkpoint, load_checkpoint_safely
from src.models.step_faults import LocatedOutOfMemoryError, locate_out_of_memory
from tests.fault_injection import tiny_config

STEPS_PER_EPOCH = 3  # the tiny config: 48 training samples, batch size 16


def fault(workdir, callback: dict) -> str:
    return str(tiny_config(workdir, trainer={"max_epochs": 3}, callbacks=[callback]))


def assert_last_good_checkpoint_kept(workdir) -> None:
    checkpoint = load_checkpoint_safely(find_last_checkpoint(workdir / "outputs"))
    assert checkpoint["global_step"] == STEPS_PER_EPOCH  # the end of epoch 0, before the fault
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_id == checkpoint["mlflow_run_id"]


def test_nan_loss_names_step_and_batch_and_keeps_the_last_checkpoint(workdir):
    nan = {"class_path": "tests.fault_injection.NanFeaturesAt", "init_args": {"global_step": 4}}
    with pytest.raises(FloatingPointError) as info:
        main(["fit", "--config", fault(workdir, nan)])
    message = str(info.value)
    assert "non-finite loss nan at global step 4, batch 1" in message
    assert "camer_" in message  # the sample names of the batch
    assert_last_good_checkpoint_kept(workdir)


@pytest.mark.parametrize(("phase", "kind"), [("forward", "cuda"), ("backward", "cpu")])
def test_out_of_memory_names_step_and_batch_and_keeps_the_last_checkpoint(workdir, phase, kind):
    oom = {
        "class_path": "tests.fault_injection.OutOfMemoryAt",
        "init_args": {"global_step": 4, "phase": phase, "kind": kind},
    }
    with pytest.raises(torch.OutOfMemoryError) as info:
        main(["fit", "--config", fault(workdir, oom)])
    err = info.value
    assert isinstance(err, LocatedOutOfMemoryError)
    assert f"out of memory in the {phase} pass at global step 4, batch 1" in str(err)
    assert "data.batch_size" in str(err)
    assert err.__cause__ is not None and "allocate" in str(err.__cause__)
    assert_last_good_checkpoint_kept(workdir)


def test_only_allocation_failures_are_relabelled():
    with pytest.raises(ValueError, match="unrelated"):
        with locate_out_of_memory("global step 0, batch 0", "forward"):
            raise ValueError("unrelated")
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        with locate_out_of_memory("global step 0, batch 0", "forward"):
            raise RuntimeError("shape mismatch")
    with pytest.raises(LocatedOutOfMemoryError, match="global step 7, batch 2: boom"):
        with locate_out_of_memory("global step 7, batch 2", "forward"):
            raise MemoryError("boom")
    # Already located (forward inside the optimizer closure): not wrapped twice.
    with pytest.raises(LocatedOutOfMemoryError) as info:
        with locate_out_of_memory("outer", "backward"):
            with locate_out_of_memory("inner", "forward"):
                raise torch.OutOfMemoryError("CUDA out of memory")
    assert "inner" in str(info.value) and "outer" not in str(info.value)
