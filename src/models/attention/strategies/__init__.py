"""AR strategies: each one file, one :class:`~src.models.attention.reallocator.Reallocator`
subclass that supplies its bias; chosen in YAML by ``class_path``."""

from typing import Any

from src.models.attention.reallocator import Reallocator
from src.models.attention.strategies.logit_scale import LogitScale
from src.models.attention.strategies.reweight import Reweight
from src.models.attention.strategies.span_mass import SpanMass

#: Strategy name -> class (the ``mode`` of the flat form :func:`build_reallocator`).
STRATEGIES: dict[str, type[Reallocator]] = {
    "reweight": Reweight,
    "span_mass": SpanMass,
    "logit_scale": LogitScale,
}


def build_reallocator(mode: str = "reweight", **kwargs: Any) -> Reallocator:
    """The strategy ``mode`` with ``kwargs`` (for scripts and tests; configs use class_path)."""
    if mode not in STRATEGIES:
        raise ValueError(f"AR mode must be one of {tuple(STRATEGIES)}, got {mode!r}")
    return STRATEGIES[mode](**kwargs)


__all__ = ["STRATEGIES", "LogitScale", "Reweight", "SpanMass", "build_reallocator"]
