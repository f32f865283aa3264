"""Which layers of a backbone an adapter adapts: the family's default, ``all-linear`` or names.

Families name their attention projections differently (Llama ``q_proj``/``v_proj``, Phi-3
``qkv_proj``, GPT-NeoX and Falcon ``query_key_value``, GPT-2 ``c_attn``, a ``Conv1D``). The default
is peft's own per-family mapping (the one ``LoraConfig`` uses when ``target_modules`` is unset);
for families peft does not list, the fused or split attention projections found in the model.
LoRA and MoSE resolve their targets here, so both adapt the same layers of any backbone.

A fused projection (``qkv_proj``, ``query_key_value``, ``c_attn``) is adapted whole (its query,
key and value outputs), as peft's LoRA adapts it; MoSE does the same so that the LoRA and MoSE
baselines adapt the same weights.
"""

from collections.abc import Sequence

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from src.core.errors import InvalidInputError

#: ``target_modules`` value: every linear layer of the transformer (not the output head).
ALL_LINEAR = "all-linear"

#: Attention projections by the names families use, tried in order for families peft does not
#: map (e.g. Phi-3's fused ``qkv_proj``, Qwen2-MoE's ``q_proj``/``v_proj``).
_ATTENTION_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("qkv_proj",),
    ("query_key_value",),
    ("c_attn",),
    ("Wqkv",),
)


class TargetsNotFoundError(InvalidInputError):
    """The adapter's ``target_modules`` name no linear layer of the backbone."""


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of an ``nn.Linear`` or transformers ``Conv1D`` (GPT-2's
    transposed linear), else ``None``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def family(model: nn.Module) -> str:
    """The backbone's ``model_type`` (``llama``, ``phi3``, ...) or its class name."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear layer except the output head (``lm_head``)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if linear_features(module) is not None and module is not head
    ]


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last name components of :func:`linear_modules`, in module order."""
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name, _ in linear_modules(model)))


def default_targets(model: nn.Module) -> list[str]:
    """peft's default targets for the backbone's family, else its attention projections."""
    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(family(model))
    names = set(linear_names(model))
    if mapped and set(mapped) <= names:
        return list(mapped)
    for candidate in _ATTENTION_NAMES:
        if set(candidate) <= names:
            return list(candidate)
    raise TargetsNotFoundError(
        f"adapter target_modules: no default for family {family(model)!r} "
        f"({type(model).__name__}): peft has no mapping and no attention projection named "
        f"{[n for c in _ATTENTION_NAMES for n in c]} exists; its linear modules are "
        f"{linear_names(model)}: set --method.adapter.init_args.target_modules to some of them "
        f"or to {ALL_LINEAR}"
    )


def resolve_targets(model: nn.Module, target_modules: str | Sequence[str] | None) -> list[str]:
    """The module names to adapt: ``None`` -> :func:`default_targets`, ``all-linear`` -> every
    linear layer's name (not the head), else the given names, each of which must exist."""
    if target_modules is None:
        return default_targets(model)
    if isinstance(target_modules, str):
        if target_modules != ALL_LINEAR:
            raise TargetsNotFoundError(
                f"adapter target_modules: {target_modules!r} is neither {ALL_LINEAR!r} nor a "
                "list of module names"
            )
        return linear_names(model)
    requested = list(dict.fromkeys(target_modules))
    existing = linear_names(model)
    missing = [name for name in requested if name not in existing]
    if not requested or missing:
        raise TargetsNotFoundError(
            f"adapter target_modules {missing or requested} not found in {family(model)} "
            f"({type(model).__name__}); its linear modules are {existing}: set "
            "--method.adapter.init_args.target_modules to some of them, to "
            f"{ALL_LINEAR}, or leave it unset (null) for the family's default "
            f"{_default_or_none(model)}"
        )
    return requested


def check_target_modules(target_modules: str | Sequence[str] | None) -> None:
    """Config-time check of a ``target_modules`` value (before any backbone exists)."""
    if isinstance(target_modules, str) and target_modules != ALL_LINEAR:
        raise InvalidInputError(
            f"adapter target_modules: {target_modules!r} is neither {ALL_LINEAR!r} nor a list "
            "of module names (null: the family's default)"
        )
    if target_modules is not None and not isinstance(target_modules, str) and not target_modules:
        raise InvalidInputError("adapter target_modules is empty (null: the family's default)")


def _default_or_none(model: nn.Module) -> list[str] | None:
    try:
        return default_targets(model)
    except TargetsNotFoundError:
        return None
