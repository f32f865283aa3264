"""MLflow logging with an sqlite store by default (recent MLflow refuses the plain file store)."""

import importlib
import os
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from mlflow.exceptions import MlflowException

from src.core.plain_data import PlainScalar
from src.tracking.backend_check import (
    DEFAULT_MLFLOW_DIR,
    TrackingBackendError,
    check_tracking_backend,
    default_tracking_uri,
    ensure_experiment,
)


def resolve_tracking_uri(tracking_uri: str | None, save_dir: str | Path) -> str:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the sqlite store in ``save_dir``."""
    if tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return str(tracking_uri or os.environ["MLFLOW_TRACKING_URI"])
    try:
        return default_tracking_uri(save_dir)
    except OSError as err:
        raise TrackingBackendError(
            f"sqlite:///{save_dir}/mlflow.db", f"cannot create the folder ({err})"
        ) from None


def check_logger_config(logger: Any) -> None:
    """Probe the backend of each :class:`MoSEARMLFlowLogger` in a LightningCLI ``trainer.logger``
    value (a ``class_path``/``init_args`` namespace, or a list of them) before anything is built:
    the CLI calls this first, so a bad backend stops the run before data and model are made."""
    for entry in logger if isinstance(logger, list) else [logger]:
        class_path = getattr(entry, "class_path", None)
        if not class_path or rank_zero_only.rank != 0:
            continue
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
        if not (isinstance(cls, type) and issubclass(cls, MoSEARMLFlowLogger)):
            continue
        args = entry.get("init_args") or {}
        if args.get("check_backend", True):
            uri = resolve_tracking_uri(args.get("tracking_uri"), args.get("save_dir") or "mlruns")
            check_tracking_backend(uri, float(args.get("backend_timeout", 5.0)))


class MoSEARMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger with defaults that work offline on a laptop and on a cluster.

    Args:
        experiment_name: MLflow experiment.
        run_name: MLflow run name.
        tracking_uri: Tracking URI; default ``$MLFLOW_TRACKING_URI`` or an sqlite database in
            ``save_dir`` (``sqlite:///<save_dir>/mlflow.db``).
        save_dir: Folder for the default sqlite store and artifacts.
        artifact_location: Artifact root of a new experiment; default ``<save_dir>/artifacts``.
        tags: Run tags (for example ``method: mosear``, ``seed: 0``) used by ``compare``.
        log_model: Lightning's option to upload checkpoints as artifacts.
        run_id: Resume logging into this existing run.
        check_backend: Probe the backend now (unreachable or locked -> a clear error before any
            training) and create the experiment under a lock (concurrent runs on one store).
        backend_timeout: Seconds the probe waits for a lock or an answer.
    """

    def __init__(
        self,
        experiment_name: str = "mosear",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        save_dir: str = DEFAULT_MLFLOW_DIR,
        artifact_location: str | None = None,
        tags: dict[str, PlainScalar] | None = None,
        log_model: Literal[True, False, "all"] = False,
        run_id: str | None = None,
        check_backend: bool = True,
        backend_timeout: float = 5.0,
    ) -> None:
        tracking_uri = resolve_tracking_uri(tracking_uri, save_dir)
        if artifact_location is None and tracking_uri.startswith("sqlite:"):
            artifact_dir = Path(save_dir).resolve() / "artifacts"
            try:
                artifact_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise TrackingBackendError(
                    tracking_uri, f"cannot create {artifact_dir} ({err})"
                ) from None
            artifact_location = artifact_dir.as_uri()
        # Before the base class builds its client (which already opens the store): rank zero
        # only, the other ranks never write to the store.
        experiment_id = None
        if check_backend and rank_zero_only.rank == 0:
            check_tracking_backend(tracking_uri, backend_timeout)
            if run_id is None:
                experiment_id = ensure_experiment(tracking_uri, experiment_name, artifact_location)
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=tracking_uri,
            tags={str(k): str(v) for k, v in (tags or {}).items()} or None,
            save_dir=save_dir,
            log_model=log_model,
            artifact_location=artifact_location,
            run_id=run_id,
        )
        self._experiment_id = experiment_id

    def resume(self, run_id: str, step: int | None = None) -> None:
        """Log into the existing run ``run_id`` (``fit --ckpt_path`` of an interrupted run).

        Must be called before anything is logged. An interrupted run (``RUNNING``, ``FAILED``,
        ``KILLED``) is marked ``RUNNING`` again; its metric points up to the steps it already
        logged are not logged again, and hyper-parameters whose value changed (a moved data
        root) are recorded as tags ``mosear.resumed.<key>`` instead of failing. A ``FINISHED``
        run is never reopened, nor is a run the store does not have (a checkpoint copied from
        another machine): a warning is given and a new run is started, tagged
        ``mosear.resumed_from_run``.

        Args:
            run_id: The run named by the checkpoint.
            step: The checkpoint's global step (named in the resumed config's artifact name).
        """
        if self._run_id == run_id:
            return
        if self._initialized or self._run_id is not None:
            raise RuntimeError(
                f"cannot resume MLflow run {run_id}: this logger already uses run {self._run_id}"
                " (drop trainer.logger.init_args.run_id, or resume from that run's checkpoint)"
            )
        if rank_zero_only.rank == 0:
            try:
                run = self._mlflow_client.get_run(run_id)
            except MlflowException:
                run = None
            if run is None or run.info.lifecycle_stage == "deleted":
                why = f"which {self._tracking_uri} does not have (or has deleted)"
            elif run.info.status == "FINISHED":
                why = "which is FINISHED and is never reopened"
            else:
                why = None
            if why is not None:
                rank_zero_warn(
                    f"the checkpoint belongs to MLflow run {run_id}, {why}: logging the resumed "
                    "training to a new run"
                )
                self.tags = {**(self.tags or {}), "mosear.resumed_from_run": run_id}
                return
            self._logged_steps = {
                key: max(m.step for m in self._mlflow_client.get_metric_history(run_id, key))
                for key in run.data.metrics
            }
            self._logged_params = dict(run.data.params)
            if run.info.status != "RUNNING":
                self._mlflow_client.update_run(run_id, status="RUNNING")
        self._resumed_step = step
        self._run_id = run_id

    @property
    def resumed(self) -> bool:
        """Whether this logger continues an interrupted run."""
        return getattr(self, "_logged_params", None) is not None

    @property
    def resumed_step(self) -> int | None:
        """The global step of the checkpoint a resumed run continues from."""
        return getattr(self, "_resumed_step", None)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if not self.resumed:
            return super().log_hyperparams(params)
        # MLflow refuses a changed param value ("Changing param values is not allowed"): in a
        # resumed run, new keys are logged, changed values are recorded as tags.
        flat = _flatten_dict(_convert_params(params))
        new = {k: v for k, v in flat.items() if k not in self._logged_params}
        changed = {
            k: str(v)
            for k, v in flat.items()
            if k in self._logged_params and self._logged_params[k] != str(v)[:250]
        }
        if new:
            super().log_hyperparams(new)
        for key, value in changed.items():
            self.experiment.set_tag(self.run_id, f"mosear.resumed.{key}", value[:5000])
        if changed:
            rank_zero_warn(
                f"resumed run {self.run_id}: {len(changed)} parameter(s) changed since it was "
                f"interrupted ({', '.join(sorted(changed)[:5])}); recorded as tags "
                "mosear.resumed.<key>"
            )
        self._logged_params.update({k: str(v)[:250] for k, v in new.items()})

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        logged = getattr(self, "_logged_steps", None)
        if logged:
            # A resumed run replays the steps after its checkpoint: points the interrupted
            # process already logged are not logged twice.
            metrics = {k: v for k, v in metrics.items() if (step or 0) > logged.get(k, -1)}
            if not metrics:
                return
        super().log_metrics(metrics, step)

    def start_run(self) -> None:
        """Create (or open) the MLflow run now, in this process.

        Called in the launching process before ``ddp_spawn`` starts its workers, so the workers
        and the test after fit log into this one run instead of each making their own.
        """
        if rank_zero_only.rank == 0:
            _ = self.experiment

    def share_run_id(self, strategy: Any) -> str | None:
        """Broadcast rank zero's run id so every rank knows it (a collective: call on all)."""
        run_id = strategy.broadcast(self._run_id if rank_zero_only.rank == 0 else None, src=0)
        if run_id is not None:
            self._run_id = run_id
        return run_id

    @property
    def tracking_uri(self) -> str:
        """The tracking URI this logger writes to."""
        return self._tracking_uri
