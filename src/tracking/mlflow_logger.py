"""MLflow logging with an sqlite store by default (recent MLflow refuses the plain file store)."""

import importlib
import os
from pathlib import Path
from typing import Any, Literal

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH as MAX_PARAMS_PER_BATCH

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
        log_system_metrics: Log MLflow's system metrics (``system/cpu_utilization_percentage``,
            ``system/system_memory_usage_megabytes``, ``system/gpu_<i>_memory_usage_megabytes``,
            ``system/gpu_<i>_utilization_percentage``, ...) while the run is open (rank zero;
            GPU metrics need ``nvidia-ml-py``).
        system_metrics_interval: Seconds between two system-metric samples.
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
        log_system_metrics: bool = False,
        system_metrics_interval: float = 10.0,
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
        self.log_system_metrics = log_system_metrics
        self.system_metrics_interval = system_metrics_interval
        self._system_monitor: Any = None
        self._config_logged = False

    def describe(self, tags: dict[str, str], run_name: str | None = None) -> None:
        """Add the CLI's tags (a user's own ``tags`` win) and a run name (unless the user gave
        one) to the run this logger is about to create; no-op once the run exists."""
        if self._initialized or self._run_id is not None:
            return
        self.tags = {**tags, **(self.tags or {})}
        if self._run_name is None and run_name:
            self.tags.setdefault(MLFLOW_RUN_NAME, run_name)

    @rank_zero_only
    def log_config_params(self, params: dict[str, str]) -> None:
        """Log the flattened resolved config as the run's params (``run_metadata``); the
        module's init args (:meth:`log_hyperparams`) are then not logged on top."""
        self._log_params(params)
        self._config_logged = True

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        """The module's init args, when no config was logged (use outside the CLI), private
        keys (``_instantiator``) left out; with the CLI the config params hold them already."""
        if self._config_logged:
            return
        plain = {k: v for k, v in _convert_params(params).items() if not str(k).startswith("_")}
        # Truncated as Lightning's MLFlowLogger does.
        self._log_params({k: str(v)[:250] for k, v in _flatten_dict(plain).items()})

    def _log_params(self, params: dict[str, str]) -> None:
        """Log ``params`` (values as the store keeps them) in batches.

        Keys the run already has (a resumed run) are not logged again. MLflow refuses a changed
        param value ("Changing param values is not allowed"), so a value that changed since the
        run was interrupted (a moved data root, more epochs) is recorded as the tag
        ``mosear.resumed.<key>`` instead.
        """
        known = self._logged_params if self.resumed else self._run_params()
        new = [Param(k, v) for k, v in params.items() if k not in known]
        changed = {k: v for k, v in params.items() if k in known and known[k] != v}
        for start in range(0, len(new), MAX_PARAMS_PER_BATCH):
            batch = new[start : start + MAX_PARAMS_PER_BATCH]
            self.experiment.log_batch(self.run_id, params=batch, **self._log_batch_kwargs)
        for key, value in changed.items():
            self.experiment.set_tag(self.run_id, f"mosear.resumed.{key}", value[:5000])
        if changed:
            rank_zero_warn(
                f"resumed run {self.run_id}: {len(changed)} parameter(s) changed since it was "
                f"interrupted ({', '.join(sorted(changed)[:5])}); recorded as tags "
                "mosear.resumed.<key>"
            )
        if self.resumed:
            self._logged_params.update({p.key: p.value for p in new})

    def _run_params(self) -> dict[str, str]:
        # A run given by run_id may hold params already; a new run has none.
        return dict(self.experiment.get_run(self.run_id).data.params)

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
                " (drop the logger's init_args.run_id, or resume from that run's checkpoint)"
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
            if self.log_system_metrics and self._system_monitor is None:
                # MLflow's own sampler (a thread), pointed at this run and store.
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._system_monitor = SystemMetricsMonitor(
                    self.run_id,
                    sampling_interval=self.system_metrics_interval,
                    resume_logging=True,
                    tracking_uri=self._tracking_uri,
                )
                self._system_monitor.start()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._system_monitor is not None:
            self._system_monitor.finish()
            self._system_monitor = None
        super().finalize(status)

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
