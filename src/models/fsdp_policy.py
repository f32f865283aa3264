"""FSDP auto-wrap policy of any Hugging Face backbone: its own ``_no_split_modules``.

Every transformers model names the blocks that must stay whole on one device
(``_no_split_modules``: ``LlamaDecoderLayer``, ``GPT2Block``, ``FalconDecoderLayer``, ...); they
are the natural FSDP units. ``conf/trainer/fsdp.yaml`` names this policy, so a backbone of any
family is sharded per decoder layer without naming its classes in the config.
"""

from collections.abc import Iterable

from torch import nn
from transformers import PreTrainedModel

from src.core.errors import InvalidInputError


def no_split_module_names(root: nn.Module) -> set[str]:
    """Class names every transformers model inside ``root`` lists in ``_no_split_modules``."""
    names: set[str] = set()
    for module in root.modules():
        if isinstance(module, PreTrainedModel):
            names |= set(getattr(module, "_no_split_modules", None) or ())
    return names


class NoSplitModulesPolicy:
    """FSDP ``auto_wrap_policy`` (the callable form ``(module, recurse, nonwrapped_numel)``):
    wrap every module whose class the backbone lists in ``_no_split_modules``.

    The classes are read from the module FSDP wraps first (the root, i.e. the LightningModule),
    so the same config shards Llama, Qwen2, GPT-2, ... each per decoder layer.

    Args:
        extra: Further class names to wrap as their own units (e.g. a large projector).
    """

    def __init__(self, extra: Iterable[str] = ()) -> None:
        self.extra = set(extra)
        self.names: set[str] | None = None

    def derive(self, root: nn.Module) -> set[str]:
        """The class names to wrap in ``root`` (its backbones' ``_no_split_modules``)."""
        names = no_split_module_names(root) | self.extra
        if not names:
            raise InvalidInputError(
                f"FSDP auto-wrap: {type(root).__name__} holds no transformers model with "
                "_no_split_modules; name the classes to wrap in "
                "trainer.strategy.init_args.auto_wrap_policy.init_args.extra"
            )
        return names

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.names is None:  # FSDP asks about the root first
            self.names = self.derive(module)
        if recurse:
            return True  # look inside every module
        return type(module).__name__ in self.names
