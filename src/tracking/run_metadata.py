"""What a CLI run records about itself: flattened config params, tags and a readable run name.

The CLI derives these from the resolved config, so every run is comparable in MLflow without the
user tagging it:

- params: the whole resolved config flattened to dotted keys (``model.init_args.adapter.init_args.
  rank``, ``trainer.max_epochs``, ``seed_everything``, ...), private keys (``_instantiator``,
  ``__path__``) and per-invocation values (``ckpt_path``, the config file list, the logger's
  tags/run name/run id) left out;
- tags: ``command``, ``method`` (adapter + AR: ``LoRA``, ``LoRA+AR``, ``MoSE``, ``MoSEAR``,
  ``LoRA+dropout``, ``LoRA+OGM-GE``, ...), ``adapter``, ``ar``, ``dataset``, ``world``
  (when the data config has one), ``seed``, ``git_commit``/``git_dirty`` (and MLflow's own
  ``mlflow.source.git.commit``), and for a test/predict run of a checkpoint ``source_run`` (the
  fit run the checkpoint came from) and ``source_checkpoint``;
- the run name: ``<method> <dataset> <command> <MMDD-HHMMSS> <4 hex>``.
"""

import re
import secrets
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
#: Top-level config keys that describe this invocation, not the experiment.
INVOCATION_KEYS = frozenset(
    {
        "config",
        "ckpt_path",
        "print_config",
        "lightning_verbose",
        "predictions_folder",
        "register_as",
        "allow_untrained",
    }
)
#: The method group (conf/method/): the CLI moves its adapter and callbacks into
#: ``model.init_args.adapter`` and ``trainer.callbacks`` (src/lightning_cli.py), where they are
#: logged; what stays behind is empty.
PLACED_KEYS = frozenset({"method"})
#: Logger init args that are tags or identity, recorded as tags instead.
LOGGER_IDENTITY_KEYS = frozenset({"tags", "run_name", "run_id"})
AR_CALLBACK_NAME = "AttentionReallocation"
#: The per-seed folder of a synthetic world's data root (conf/data/worlds/*.yaml).
SEED_FOLDER = re.compile(r"seed_\d+")
RUN_NAME_TAG = "mlflow.runName"


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (or a nested mix) as plain dicts and lists."""
    if hasattr(value, "as_dict"):
        return _plain(value.as_dict())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def flatten_config(config: Any) -> dict[str, str]:
    """The resolved config as ``{dotted key: text}``, ready for ``log_params``.

    Dicts nest with ``.``; lists of dicts are indexed (``trainer.callbacks.0.class_path``);
    other lists stay one value. Keys starting with ``_`` anywhere on the path are private
    (jsonargparse's ``__path__``, Lightning's ``_instantiator``) and dropped, as are the
    :data:`INVOCATION_KEYS` and the logger's tags/run name/run id. Values longer than MLflow's
    limit are cut, ending in ``...``.
    """
    flat: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                if key.startswith("_"):
                    continue
                if prefix.endswith("logger.init_args") and key in LOGGER_IDENTITY_KEYS:
                    continue
                visit(f"{prefix}.{key}" if prefix else key, child)
        elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
            for i, child in enumerate(value):
                visit(f"{prefix}.{i}", child)
        else:
            text = str(value)
            if len(text) > MAX_PARAM_VAL_LENGTH:
                text = text[: MAX_PARAM_VAL_LENGTH - 3] + "..."
            flat[prefix] = text

    plain = _plain(config)
    visit("", {k: v for k, v in plain.items() if k not in INVOCATION_KEYS | PLACED_KEYS})
    return flat


def _short_class(class_path: Any) -> str | None:
    return str(class_path).rsplit(".", 1)[-1] if class_path else None


#: Method names of the project's adapter classes; another adapter is named by its class name
#: without ``Adapter``.
ADAPTER_NAMES = {
    "NoAdapter": "projectors",  # only the projectors train
    "LoRAAdapter": "LoRA",
    "MoSEAdapter": "MoSE",
    "ModalityDropoutLoRAAdapter": "LoRA+dropout",
    "OGMGELoRAAdapter": "LoRA+OGM-GE",
}


def adapter_name(config: Mapping[str, Any]) -> str:
    """``LoRA``, ``MoSE``, ``LoRA+dropout``, ... from ``model.init_args.adapter.class_path``
    (the config as the CLI placed it: the method group's adapter is there);
    ``projectors`` without an adapter (only the projectors train)."""
    adapter = ((config.get("model") or {}).get("init_args") or {}).get("adapter")
    name = _short_class(adapter.get("class_path")) if isinstance(adapter, Mapping) else None
    if not name:
        return "projectors"
    return ADAPTER_NAMES.get(name) or name.removesuffix("Adapter") or name


def has_ar(config: Mapping[str, Any]) -> bool:
    """Whether an attention-reallocation callback is among ``trainer.callbacks`` (where the CLI
    appends the method group's callbacks)."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    if isinstance(callbacks, Mapping):
        callbacks = [callbacks]
    return any(
        isinstance(c, Mapping) and _short_class(c.get("class_path")) == AR_CALLBACK_NAME
        for c in callbacks
    )


def method_name(config: Mapping[str, Any]) -> str:
    """The method a config runs: the adapter, ``+AR`` when AR is on; MoSE with AR is the
    paper's ``MoSEAR``."""
    adapter = adapter_name(config)
    if not has_ar(config):
        return adapter
    return "MoSEAR" if adapter == "MoSE" else f"{adapter}+AR"


def dataset_and_world(config: Mapping[str, Any]) -> dict[str, str]:
    """``dataset`` (the data root's folder name, else the data module class) and ``world``
    (a ``world`` init arg of the data module or of its synthetic settings, when there is one).

    A world's data root ends in one folder per generator seed (``data/worlds/<world>/seed_0``):
    that folder is skipped, the data set is ``<world>`` (the seed is in the params)."""
    data = config.get("data") or {}
    args = data.get("init_args") or {}
    out: dict[str, str] = {}
    root = args.get("root")
    module = _short_class(data.get("class_path"))
    if root:
        path = Path(str(root))
        if SEED_FOLDER.fullmatch(path.name) and path.parent.name:
            path = path.parent
        out["dataset"] = path.name
    elif module:
        out["dataset"] = module.removesuffix("DataModule")
    for holder in (args, args.get("synthetic") or {}):
        world = holder.get("world") if isinstance(holder, Mapping) else None
        if isinstance(world, Mapping):
            world = _short_class(world.get("class_path")) or world.get("name")
        if world:
            out["world"] = str(world)
            break
    return out


def git_state(repo: Path = REPO_ROOT) -> dict[str, str]:
    """``git_commit`` and ``git_dirty`` of the code that runs (empty outside a git checkout)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {
        "git_commit": commit,
        "git_dirty": str(bool(status.strip())).lower(),
        "mlflow.source.git.commit": commit,
    }


def run_tags(
    config: Any,
    command: str,
    source_run: str | None = None,
    source_checkpoint: str | None = None,
) -> dict[str, str]:
    """The tags the CLI puts on a run of ``command`` with the resolved ``config``."""
    plain = _plain(config)
    tags = {
        "command": command,
        "method": method_name(plain),
        "adapter": adapter_name(plain),
        "ar": str(has_ar(plain)).lower(),
        **dataset_and_world(plain),
        **git_state(),
    }
    seed = plain.get("seed_everything")
    if seed is not None and seed is not False:
        tags["seed"] = str(seed)
    if source_run:
        tags["source_run"] = source_run
    if source_checkpoint:
        tags["source_checkpoint"] = source_checkpoint
    return tags


def run_name(tags: Mapping[str, str], now: float | None = None) -> str:
    """``<method> <dataset> <command> <MMDD-HHMMSS> <4 hex>``: readable and distinct (the
    random part does not follow the seed)."""
    stamp = time.strftime("%m%d-%H%M%S", time.localtime(now))
    parts = [tags.get("method"), tags.get("dataset"), tags.get("command"), stamp]
    return " ".join(p for p in parts if p) + f" {secrets.token_hex(2)}"


def describe_run(
    trainer: Any,
    config: Any,
    command: str,
    source_run: str | None = None,
    source_checkpoint: str | None = None,
) -> None:
    """Give the trainer's MLflow logger the CLI's tags and run name before its run is created
    (a no-op for other loggers and for a run that already exists, e.g. a resumed fit)."""
    from src.tracking.artifacts import mlflow_logger

    logger = mlflow_logger(trainer)
    if logger is None or not hasattr(logger, "describe"):
        return
    tags = run_tags(config, command, source_run, source_checkpoint)
    logger.describe(tags, run_name(tags))
