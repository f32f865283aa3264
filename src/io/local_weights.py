"""Where local weights are: a directory, or a hub id already in the local Hugging Face cache.

Nothing is ever downloaded. A hub id (``meta-llama/Llama-2-7b-chat-hf``) resolves to its cached
snapshot when the model sits in the Hugging Face cache (``HF_HUB_CACHE``, else
``$HF_HOME/hub``: often shared on clusters), read with ``local_files_only``; anything else is
one line saying how to point at local weights.
"""

import os
from pathlib import Path

from src.core.errors import MissingInputError


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def resolve_local(name_or_path: str | Path, option: str) -> Path:
    """A local directory: ``name_or_path`` itself, or the cached snapshot of a hub id.

    Args:
        name_or_path: A directory, or a hub id (``org/name``) in the local cache.
        option: The config field, for the error (``model.backbone.path``, ``data.tokenizer``).
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    text = str(name_or_path)
    cache = hub_cache_dir()
    if _looks_like_hub_id(text):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, cache_dir=str(cache), local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            pass
    raise MissingInputError(
        f"{option} {text!r} is neither a local directory nor a model in the local Hugging Face "
        f"cache ({cache}; set HF_HOME or HF_HUB_CACHE to a shared one). Nothing is downloaded: "
        f"on a machine with network run `hf download <repo id> --local-dir /models/<name>` (or "
        f"`hf download <repo id>` into the cache), then set {option} to that directory (or the "
        "repo id)"
    )


def _looks_like_hub_id(text: str) -> bool:
    """``name`` or ``org/name`` (not an absolute or relative path)."""
    parts = text.split("/")
    return (
        0 < len(parts) <= 2
        and all(parts)
        and not text.startswith((".", "~"))
        and not any(p in (".", "..") for p in parts)
    )
