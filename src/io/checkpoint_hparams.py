"""The hyper-parameters stored in a checkpoint are data: merged into the config as plain values.

LightningCLI merges ``checkpoint["hyper_parameters"]`` into the parsed config through the
parser, so a ``class_path`` (or ``_class_path``) in the file would be imported and, inside an
``Any``-typed value, instantiated: a file that ``torch.load(weights_only=True)`` accepts could
still run code. :func:`plain_checkpoint_hparams` returns the mergeable part and refuses anything
that names code; the model class the file was written by is compared as a string with the
configured one, never imported.
"""

import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

from lightning.pytorch.utilities import rank_zero_warn

from src.core.errors import UserError

#: Keys with which jsonargparse (and Lightning) name a class to import and build.
CODE_KEYS: frozenset[str] = frozenset(
    {"class_path", "_class_path", "init_args", "dict_kwargs", "_instantiator", "__path__"}
)
_PLAIN = (str, int, float, bool, type(None))


class CheckpointHparamsError(UserError, ValueError):
    """A checkpoint's ``hyper_parameters`` name code, or another model class than the config."""


def _check_plain(value: Any, where: str, path: Path) -> None:
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", path)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointHparamsError(
                    f"{path}: field {where} has a non-string key {key!r}: refused"
                )
            if key in CODE_KEYS:
                raise CheckpointHparamsError(
                    f"{path}: field {where}.{key} ({str(item)[:80]!r}) names code to import or "
                    "build; a checkpoint is data and can only hold plain values: refused"
                )
            _check_plain(item, f"{where}.{key}", path)
        return
    raise CheckpointHparamsError(
        f"{path}: field {where} is a {type(value).__name__}, not a plain value: refused"
    )


def is_plain_type(annotation: Any) -> bool:
    """Whether an init argument's type admits plain data only (scalars, ``Literal``, and
    lists/tuples/string-keyed dicts of those): never a class, a dataclass or ``Any``, whose
    values the parser would resolve (a string there names a class to import)."""
    if annotation in _PLAIN:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return all(isinstance(a, _PLAIN) for a in args)
    if origin in (Union, types.UnionType):
        return all(is_plain_type(a) for a in args)
    if origin in (list, tuple, Sequence):
        return all(a is Ellipsis or is_plain_type(a) for a in args)
    if origin in (dict, Mapping):
        return len(args) == 2 and args[0] is str and is_plain_type(args[1])
    return False


def _plain_parameters(model_class: type) -> set[str]:
    hints = typing.get_type_hints(model_class.__init__)
    names = inspect.signature(model_class.__init__).parameters
    return {n for n in names if n in hints and is_plain_type(hints[n])}


def plain_checkpoint_hparams(
    checkpoint: Mapping[str, Any],
    path: str | Path,
    model_class_path: str | None,
    model_class: type | None = None,
    skip: Sequence[str] = (),
) -> dict[str, Any]:
    """The model init arguments stored in ``checkpoint``, checked to be plain data.

    Args:
        checkpoint: A checkpoint loaded weights-only.
        path: Its file (named in errors).
        model_class_path: The model class the config builds (``model.class_path``).
        model_class: That class: only its init arguments of a plain type are merged (a value
            for a class-typed argument, even a string, would be resolved by the parser);
            others are left out with a warning.
        skip: Arguments never merged (e.g. the ones linked from the data module).

    Returns:
        ``{argument: value}`` of plain values (strings, numbers, booleans, ``None``, lists and
        string-keyed dicts of those), without Lightning's bookkeeping keys.

    Raises:
        CheckpointHparamsError: A value names a class or module (``class_path``, ``init_args``,
            ...), is not plain, or the file was written by another model class.
    """
    path = Path(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        raise CheckpointHparamsError(f"{path}: field hyper_parameters is not a mapping: refused")
    hparams = dict(hparams)
    hparams.pop("_instantiator", None)  # Lightning's own loader name; never imported here
    written_by = hparams.pop("_class_path", None)
    if written_by is not None and written_by != model_class_path:
        raise CheckpointHparamsError(
            f"{path}: field hyper_parameters._class_path: the checkpoint was written by "
            f"{str(written_by)[:120]!r} but the config builds {model_class_path!r}: pass the "
            "config the checkpoint was trained with"
        )
    _check_plain(hparams, "hyper_parameters", path)
    for key in skip:
        hparams.pop(key, None)
    if model_class is not None:
        plain = _plain_parameters(model_class)
        left_out = sorted(k for k in hparams if k not in plain)
        if left_out:
            rank_zero_warn(
                f"{path}: hyper_parameters {left_out} are not plain init arguments of "
                f"{model_class_path}; not merged into the config"
            )
        hparams = {k: v for k, v in hparams.items() if k in plain}
    return hparams


def plain_component_hparams(
    stored: Any, path: str | Path, field: str, class_path: str | None, component_class: type
) -> dict[str, Any]:
    """The plain settings of a component (the backbone) stored as ``{"class": str,
    "settings": {...}}`` in a checkpoint's hyper_parameters, for the configured class only.

    Args:
        stored: ``hyper_parameters[field]``, already checked to be plain.
        path: The checkpoint file (named in errors).
        field: The init argument (``backbone``).
        class_path: The component class the config builds.
        component_class: That class: only its plain init arguments are returned.

    Raises:
        CheckpointHparamsError: The field is malformed or names another class than the config.
    """
    path = Path(path)
    if not isinstance(stored, Mapping) or not isinstance(stored.get("settings"), Mapping):
        raise CheckpointHparamsError(
            f"{path}: field hyper_parameters.{field} is not {{class, settings}}: refused"
        )
    written_by = stored.get("class")
    if written_by != class_path:
        raise CheckpointHparamsError(
            f"{path}: field hyper_parameters.{field}.class: the checkpoint's {field} is "
            f"{str(written_by)[:120]!r} but the config builds {class_path!r}: pass the config "
            "the checkpoint was trained with"
        )
    plain = _plain_parameters(component_class)
    return {k: v for k, v in stored["settings"].items() if k in plain}
