"""The tracking backend: unreachable or locked fails fast, before training, with a clear message;
two runs logging to one sqlite store at once both end complete."""

import http.server
import socket
import sqlite3
import threading
import time

import mlflow
import pytest

from src.tracking.backend_check import TrackingBackendError, ensure_experiment
from src.tracking.mlflow_logger import MoSEARMLFlowLogger
from tests.fault_injection import SMALL, cli, expect_user_error, finish, tiny_config


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_fast_before_training(workdir, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingBackendError) as info:
        MoSEARMLFlowLogger(tracking_uri=uri, backend_timeout=2)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert uri in message and "does not answer" in message and "Nothing was trained" in message
    # Through the CLI: the error comes before data and model are built, so nothing is trained.
    config = tiny_config(workdir, logger={"tracking_uri": uri, "backend_timeout": 2})
    assert "does not answer" in expect_user_error(capsys, ["fit", "--config", str(config)])
    assert not (workdir / "outputs").exists() and not (workdir / "data").exists()


class HealthyButBroken(http.server.BaseHTTPRequestHandler):
    """Answers ``/health`` with OK and every API call with HTTP 500 (counting them)."""

    api_calls = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            body, status = b"OK", 200
        else:
            type(self).api_calls += 1
            body, status = b'{"error_code": "INTERNAL_ERROR", "message": "db down"}', 500
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET  # noqa: N815

    def log_message(self, *args) -> None:
        pass


def test_server_whose_health_passes_but_whose_api_fails_is_found_at_start_up(workdir, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HealthyButBroken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        config = tiny_config(workdir, logger={"tracking_uri": uri, "backend_timeout": 2})
        line = expect_user_error(capsys, ["fit", "--config", str(config)])
    finally:
        server.shutdown()
        server.server_close()
    assert uri in line and "answers /health but its API fails" in line and "HTTP 500" in line
    assert "db down" in line
    assert HealthyButBroken.api_calls == 1  # one probe, no retries
    # Before data generation and model building.
    assert not (workdir / "outputs").exists() and not (workdir / "data").exists()


def test_locked_sqlite_store_fails_fast(workdir):
    db = workdir / "mlruns" / "mlflow.db"
    uri = f"sqlite:///{db}"
    ensure_experiment(uri, "tests")  # an existing store
    holder = sqlite3.connect(db)
    holder.execute("BEGIN EXCLUSIVE")  # e.g. an sqlite shell left inside a transaction
    try:
        start = time.monotonic()
        with pytest.raises(TrackingBackendError) as info:
            MoSEARMLFlowLogger(experiment_name="tests", save_dir="mlruns", backend_timeout=1)
        assert time.monotonic() - start < 8
        assert "is locked by another process" in str(info.value) and str(db) in str(info.value)
    finally:
        holder.rollback()
        holder.close()
    # Released: the same logger works.
    logger = MoSEARMLFlowLogger(experiment_name="tests", save_dir="mlruns", backend_timeout=1)
    assert (
        logger.experiment_id
        == mlflow.MlflowClient(uri).get_experiment_by_name("tests").experiment_id
    )


def test_store_that_cannot_be_created_or_is_not_a_database(workdir):
    (workdir / "a_file").write_text("not a folder")
    with pytest.raises(TrackingBackendError, match="cannot create the folder"):
        MoSEARMLFlowLogger(save_dir=str(workdir / "a_file" / "mlruns"))
    junk = workdir / "junk"
    junk.mkdir()
    (junk / "mlflow.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(TrackingBackendError, match="not a usable sqlite database"):
        MoSEARMLFlowLogger(save_dir=str(junk))


def test_experiment_creation_is_idempotent_and_refuses_a_deleted_one(workdir):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    first = ensure_experiment(uri, "shared")
    assert ensure_experiment(uri, "shared") == first
    mlflow.MlflowClient(uri).delete_experiment(first)
    with pytest.raises(TrackingBackendError, match="'shared' is deleted"):
        ensure_experiment(uri, "shared")


@pytest.mark.slow
def test_two_runs_logging_to_one_sqlite_store_at_once_both_finish(tmp_path):
    uri = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"  # fresh: both create it at once
    processes = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        config = tiny_config(
            folder,
            trainer={"max_epochs": 2},
            logger={"tracking_uri": uri, "run_name": name},
            data={"synthetic": SMALL},
        )
        processes.append(cli(folder, "fit", "--config", str(config)))
    for process in processes:
        finish(process)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"test/acc", "val/acc", "train/loss"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 2
        assert [a.path for a in client.list_artifacts(run.info.run_id, "")].count("config.yaml")
