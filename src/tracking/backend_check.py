"""Fail fast when the MLflow tracking backend is unreachable or locked, before any training.

A run that trains for a week and then cannot log its results has lost them. The logger calls
:func:`check_tracking_backend` when it is built (before the trainer starts): an sqlite store
must be creatable, writable and lockable within ``timeout`` seconds; an http(s) server must
answer within ``timeout`` seconds. :func:`ensure_experiment` then creates the experiment (and, for
a fresh sqlite store, its tables) under a file lock, so several runs starting at once on one
store do not race.
"""

import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from src.core.errors import UserError

#: Folder of the default sqlite store (``<dir>/mlflow.db``).
DEFAULT_MLFLOW_DIR = "mlruns"

WHAT_TO_DO = (
    "Nothing was trained. Fix the logger's tracking_uri (--tracking.logger.init_args.tracking_uri, "
    "or $MLFLOW_TRACKING_URI), start the tracking server, or log to a local store with "
    "--tracking.logger.init_args.save_dir <folder> and no tracking_uri (trainer.logger.init_args "
    "where a config sets trainer.logger itself)."
)


class TrackingBackendError(UserError, RuntimeError):
    """The tracking backend cannot be used; the message names the URI and what to do."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"MLflow tracking backend {uri}: {reason}. {WHAT_TO_DO}")
        self.uri = uri
        self.reason = reason


def default_tracking_uri(directory: str | Path = DEFAULT_MLFLOW_DIR) -> str:
    """``sqlite:///<abs dir>/mlflow.db``, creating the folder (here, not in the Lightning
    logger's module, so that ``compare`` does not import Lightning)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an ``sqlite:///...`` URI (``None`` for an in-memory database)."""
    rest = uri.split(":", 1)[1].removeprefix("///")
    if not rest or rest.startswith(":memory:"):
        return None
    return Path(rest.split("?", 1)[0])


def _check_sqlite(uri: str, timeout: float) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrackingBackendError(uri, f"cannot create the folder {path.parent} ({err})") from None
    # sqlite writes a journal beside the database: the folder itself must be writable.
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise TrackingBackendError(uri, f"the folder {path.parent} is not writable")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise TrackingBackendError(uri, f"the database {path} is not readable and writable")
    try:
        connection = sqlite3.connect(path, timeout=timeout)
    except sqlite3.Error as err:
        raise TrackingBackendError(uri, f"cannot open the database {path} ({err})") from None
    try:
        # Take (and give back) the write lock: fails after `timeout` s if another process holds
        # the database locked, instead of training first and failing at the first log call.
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        connection.rollback()
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise TrackingBackendError(
                uri,
                f"the database {path} is locked by another process (waited {timeout:g} s); "
                "close the program holding it (e.g. an sqlite shell in a transaction) and retry",
            ) from None
        raise TrackingBackendError(uri, f"cannot use the database {path} ({err})") from None
    except sqlite3.DatabaseError as err:
        raise TrackingBackendError(uri, f"{path} is not a usable sqlite database ({err})") from None
    finally:
        connection.close()


#: One cheap read of the tracking API: a server whose /health passes can still fail here.
API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"


def _check_http(uri: str, timeout: float) -> None:
    base = uri.rstrip("/")
    try:
        with urllib.request.urlopen(base + "/health", timeout=timeout):  # noqa: S310
            pass
    except urllib.error.HTTPError:
        pass  # the server answered (an older server or a proxy may lack /health)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingBackendError(
            uri, f"the server does not answer within {timeout:g} s ({reason})"
        ) from None
    # One real API call, no retries: MLflow's client would retry a failing API for minutes.
    try:
        with urllib.request.urlopen(base + API_PROBE, timeout=timeout):  # noqa: S310
            pass
    except urllib.error.HTTPError as err:
        body = err.read(300).decode("utf-8", "replace").strip()
        raise TrackingBackendError(
            uri,
            f"the server answers /health but its API fails: GET {API_PROBE} returned HTTP "
            f"{err.code} ({' '.join(body.split())[:200] or err.reason})",
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingBackendError(
            uri, f"the API call GET {API_PROBE} got no answer within {timeout:g} s ({reason})"
        ) from None


def check_tracking_backend(uri: str, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingBackendError` unless ``uri`` can be logged to right now.

    Args:
        uri: MLflow tracking URI (``sqlite:///...``, ``http(s)://...``; other schemes are
            checked only through :func:`ensure_experiment`).
        timeout: Seconds to wait for a lock or an answer.
    """
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        _check_sqlite(uri, timeout)
    elif scheme in ("http", "https"):
        _check_http(uri, timeout)


def ensure_experiment(
    uri: str, name: str, artifact_location: str | None = None, timeout: float = 60.0
) -> str:
    """The id of experiment ``name`` in ``uri``, created if missing; safe to call concurrently.

    For sqlite, a file lock beside the database serialises the first store initialisation and
    the experiment creation across processes; elsewhere a concurrent creation is tolerated.
    """
    path = sqlite_path(uri) if uri.startswith("sqlite:") else None
    lock = FileLock(str(path) + ".lock", timeout=timeout) if path is not None else None
    try:
        if lock is not None:
            lock.acquire()
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise TrackingBackendError(
                uri,
                f"experiment {name!r} is deleted: restore it (mlflow experiments restore) or "
                "choose another experiment_name",
            )
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return client.get_experiment_by_name(name).experiment_id  # created meanwhile
    except Timeout:
        raise TrackingBackendError(
            uri, f"another process held {lock.lock_file if lock else ''} for {timeout:g} s"
        ) from None
    except MlflowException as err:
        raise TrackingBackendError(uri, f"the store refused a request ({err.message})") from None
    except SQLAlchemyError as err:
        raise TrackingBackendError(uri, f"the database failed ({err})") from None
    finally:
        if lock is not None and lock.is_locked:
            lock.release()
