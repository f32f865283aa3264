"""Loads a frozen transformers causal LM: from a local checkpoint directory or from a config."""

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from src.io.local_weights import resolve_local

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """``float32``/``bfloat16``/``float16`` -> torch dtype, with a clear error otherwise."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of {list(_DTYPES)}") from None


def load_causal_lm(
    path: str | None = None,
    config: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A frozen ``AutoModelForCausalLM``.

    Args:
        path: Local checkpoint directory (LLaMA-2-7B, Emotion-LLaMA, ...), or a hub id of a
            model already in the local Hugging Face cache (``HF_HOME``): nothing is downloaded.
        config: Keyword arguments of a model config (``model_type`` defaults to ``llama``) for a
            randomly initialised model, e.g. the tiny demo backbone.
        vocab_size: Vocabulary size of the tokenizer, used with ``config``.
        dtype: Parameter dtype.
        attn_implementation: transformers attention implementation (``sdpa``, ``eager``, ...);
            ``None``: the family's default (``sdpa`` where the family supports it, else
            ``eager``, e.g. Gemma2, whose logit softcapping SDPA cannot do).
        seed: Seed of the random initialisation with ``config``: the frozen backbone must be the
            same in every process and every run, since checkpoints hold trainable weights only.
    """
    if (path is None) == (config is None):
        raise ValueError(
            "give exactly one of model.backbone.path (local dir) or model.backbone.config"
        )
    torch_dtype = resolve_dtype(dtype)
    if path is not None:
        # A directory, or a hub id already in the local Hugging Face cache (never downloaded).
        path = str(resolve_local(path, "model.backbone.path"))
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=torch_dtype, attn_implementation=attn_implementation
        )
    else:
        kwargs = dict(config)
        model_type = kwargs.pop("model_type", "llama")
        if vocab_size is not None:
            # A config may embed more tokens than the tokenizer has (padded vocabularies).
            kwargs.setdefault("vocab_size", vocab_size)
        cfg = AutoConfig.for_model(model_type, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
        model = model.to(torch_dtype)
    if vocab_size is not None and model.get_input_embeddings().num_embeddings < vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the backbone embeds only "
            f"{model.get_input_embeddings().num_embeddings}: use the checkpoint's own tokenizer"
        )
    model.requires_grad_(False)
    model.eval()
    return model
