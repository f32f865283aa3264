"""Loads frozen transformers models (a causal LM, or a multimodal model such as Qwen2.5-Omni's
thinker): from a local checkpoint directory or from a config."""

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from src.core.errors import InvalidInputError
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


def load_multimodal_model(
    model_class: type[PreTrainedModel],
    config_class: type,
    path: str | None,
    config: dict[str, Any] | None,
    vocab_size: int,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A frozen HF multimodal model (towers + text model) in eval mode.

    Args:
        model_class: The model class (``Qwen2_5OmniThinkerForConditionalGeneration``, ...).
        config_class: Its config class, built as ``config_class(text_config=..., **config)``.
        path: Local checkpoint directory (or a hub id already in the local cache); when given,
            ``config`` is not used.
        config: Config kwargs of a randomly initialised model (tests); the text vocabulary
            defaults to ``vocab_size``.
        vocab_size: The tokenizer's size: a model that embeds fewer tokens is refused.
        dtype: Parameter dtype.
        attn_implementation: transformers attention implementation; ``None``: the default.
        seed: Seed of the random initialisation (the frozen weights are not checkpointed).
    """
    torch_dtype = resolve_dtype(dtype)
    if path is not None:
        model = model_class.from_pretrained(
            str(resolve_local(path, "model.backbone.path")),
            local_files_only=True,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
        )
    else:
        kwargs = dict(config or {})
        text = dict(kwargs.pop("text_config", None) or {})
        text.setdefault("vocab_size", vocab_size)
        cfg = config_class(text_config=text, **kwargs)
        if attn_implementation is not None:
            cfg._attn_implementation = attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class(cfg)
        model = model.to(torch_dtype)
    embeds = model.get_input_embeddings().num_embeddings
    if embeds < vocab_size:
        raise InvalidInputError(
            f"the tokenizer has {vocab_size} tokens but {model_class.__name__} embeds only "
            f"{embeds}: use the checkpoint's own tokenizer"
        )
    model.requires_grad_(False)
    model.eval()
    return model
