"""Switch a Hugging Face backbone to a :class:`Reallocator` and back, through public APIs only.

transformers keeps attention functions (``AttentionInterface``) and their mask builders
(``AttentionMaskInterface``) in global, name-keyed registries with no way to unregister. Each
installation therefore registers a small dispatcher under its own unique name; the dispatcher
looks the reallocator up in :data:`_ACTIVE`, so after :func:`restore_attention` nothing keeps the
reallocator (or the model it is bound to) alive, and a stale call fails loudly.
"""

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from src.core.errors import InvalidInputError
from src.models.attention.reallocator import Reallocator

_ACTIVE: dict[str, Reallocator] = {}


def unique_name(prefix: str = "mosear_ar") -> str:
    """A fresh attention-implementation name (registration is global by name)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def unwrap_backbone(backbone: nn.Module) -> nn.Module:
    """The transformers model inside a peft ``PeftModel`` (or the backbone itself)."""
    get_base_model = getattr(backbone, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else backbone


class AttentionSwitchError(InvalidInputError):
    """The backbone cannot run AR: it does not dispatch attention through transformers'
    ``AttentionInterface`` (e.g. Falcon), so its attention function cannot be switched."""


def check_switchable(backbone: nn.Module) -> None:
    """Refuse, in one line, a backbone whose attention implementation cannot be switched (run
    before fit by the AR callback, so a long training is not lost to a failing test)."""
    model = unwrap_backbone(backbone)
    compatible = getattr(model, "is_backend_compatible", None)
    config = getattr(model, "config", None)
    if callable(compatible) and not compatible():
        family = getattr(config, "model_type", None) or type(model).__name__
        raise AttentionSwitchError(
            f"attention reallocation (AR) cannot run on {family} ({type(model).__name__}): it "
            "does not use transformers' AttentionInterface, so its attention cannot be "
            "switched; use a method without AR (conf/method/lora.yaml, mose.yaml) or another "
            "backbone"
        )


def _dispatcher(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        reallocator = _ACTIVE.get(name)
        if reallocator is None:
            raise RuntimeError(
                f"attention implementation {name!r} was uninstalled but the model still uses it"
            )
        return reallocator(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"attention_{name}"
    return attention


def install_reallocator(backbone: nn.Module, reallocator: Reallocator, name: str) -> str:
    """Register ``reallocator`` under ``name`` and switch ``backbone`` to it.

    Args:
        backbone: a transformers model, possibly wrapped in a peft ``PeftModel``.
        reallocator: a bound :class:`Reallocator`.
        name: a name unique to this installation (see :func:`unique_name`).

    Returns:
        The backbone's previous attention implementation, for :func:`restore_attention`.
    """
    if not reallocator.is_bound:
        raise RuntimeError("bind the Reallocator to a ModalityContext before installing it")
    if name in _ACTIVE:
        raise RuntimeError(f"attention implementation {name!r} is already installed")
    check_switchable(backbone)
    model = unwrap_backbone(backbone)
    original = model.config._attn_implementation
    AttentionInterface.register(name, _dispatcher(name))
    # The mask builder decides the mask format our function receives: boolean (or none, for
    # SDPA's is_causal path) for the SDPA modes, additive float for the eager PAI baseline.
    mask_builder = eager_mask if reallocator.eager else sdpa_mask
    AttentionMaskInterface.register(name, mask_builder)
    _ACTIVE[name] = reallocator
    try:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise RuntimeError(
                f"{type(model).__name__} does not support switching its attention implementation"
            )
    except Exception:
        _ACTIVE.pop(name, None)
        model.set_attn_implementation(original)
        raise
    return original


def restore_attention(backbone: nn.Module, name: str, original: str) -> None:
    """Switch ``backbone`` back to ``original`` and deactivate ``name``."""
    _ACTIVE.pop(name, None)
    model = unwrap_backbone(backbone)
    if model.config._attn_implementation != original:
        model.set_attn_implementation(original)


@contextmanager
def reallocated(
    backbone: nn.Module, reallocator: Reallocator, name: str | None = None
) -> Iterator[Reallocator]:
    """Run the ``with`` body with ``backbone`` using ``reallocator`` (already bound)."""
    name = name or unique_name()
    original = install_reallocator(backbone, reallocator, name)
    try:
        yield reallocator
    finally:
        restore_attention(backbone, name, original)
