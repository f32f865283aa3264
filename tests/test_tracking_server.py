"""Against a real tracking server: `mlflow server` on 127.0.0.1 (sqlite store, artifact folder),
a fit logging to it over HTTP, `compare` reading it, a registry round-trip, `test` of
``models:/<name>/<version>``. The server is started by the fixture and always killed."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from src.cli import main
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(workdir: Path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (workdir / "server").mkdir()
    log = (workdir / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'server' / 'mlflow.db'}",
            "--artifacts-destination",
            str(workdir / "server" / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    try:
        deadline = time.monotonic() + 300  # a loaded CI machine
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"mlflow server did not start: {(workdir / 'server.log').read_text()}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, 15)  # its own session: the server and its workers only
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        log.close()


def test_fit_compare_register_and_test_over_http(server, workdir, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    fit = main(["fit", "--config", str(TINY_CONFIG)])
    out = capsys.readouterr().out
    assert f"open {server}/#/experiments/" in out
    client = mlflow.MlflowClient(server)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "LoRA"
    assert run.data.params["model.init_args.adapter.init_args.r"] == "4"
    # Artifacts went to the server's artifact folder, not to a local path.
    best = Path(fit.trainer.checkpoint_callback.best_model_path).name
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        f"checkpoints/{best}"
    ]
    assert list((workdir / "server" / "artifacts").rglob(best))

    assert main(["compare", "--experiments", "[tests]", "--output", "cmp"]) == 0
    table = pd.read_csv(workdir / "cmp" / "comparison.csv")
    assert list(table["tags.method"]) == ["LoRA"] and list(table["n"]) == [1]

    # Registry round-trip with MLflow's own API on the logged model of the run.
    mlflow.set_tracking_uri(server)
    (output,) = client.get_run(run.info.run_id).outputs.model_outputs
    version = mlflow.register_model(f"models:/{output.model_id}", "tiny-lora-http")
    assert client.get_model_version("tiny-lora-http", version.version).run_id == run.info.run_id

    main(
        [
            "test",
            "--config",
            str(TINY_CONFIG),
            "--ckpt_path",
            f"models:/tiny-lora-http/{version.version}",
        ]
    )
    runs = client.search_runs([run.info.experiment_id], filter_string="tags.command = 'test'")
    assert len(runs) == 1 and runs[0].data.tags["source_run"] == run.info.run_id
    assert runs[0].data.metrics["test/acc"] == pytest.approx(run.data.metrics["test/acc"])

    # The registered model as MLflow users load it: a pyfunc whose predict runs `predict`.
    model = mlflow.pyfunc.load_model(f"models:/tiny-lora-http/{version.version}")
    names = ["camer_000072", "camer_000073", "not_a_sample"]
    predictions = model.predict(pd.DataFrame({"name": names}))
    assert sorted(predictions["name"]) == names[:2]
    assert set(predictions["prediction"]) <= set(fit.model.model.labels)
