"""AR (attention reallocation): the attention function, its math and the share monitor."""

from src.models.attention.interface import (
    install_reallocator,
    reallocated,
    restore_attention,
    unique_name,
    unwrap_backbone,
)
from src.models.attention.reallocator import Reallocator
from src.models.attention.share_monitor import ShareMonitor
from src.models.attention.spans import MONITORED
from src.models.attention.strategies import (
    STRATEGIES,
    LogitScale,
    Reweight,
    SpanMass,
    build_reallocator,
)

__all__ = [
    "MONITORED",
    "STRATEGIES",
    "LogitScale",
    "Reweight",
    "SpanMass",
    "build_reallocator",
    "Reallocator",
    "ShareMonitor",
    "install_reallocator",
    "reallocated",
    "restore_attention",
    "unique_name",
    "unwrap_backbone",
]
