"""Tiny random checkpoints of common Hugging Face LLM families, saved as a user's local model.

Each :func:`save_family` writes a directory that looks like a downloaded checkpoint: a model
saved with ``save_pretrained`` (1 layer, hidden 32, random init) and a byte-level BPE tokenizer
trained here with ``tokenizers`` (the kind GPT-2, Llama-3, Qwen and Phi-3 ship). Nothing is
downloaded.
"""

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from src.core.label_space import MER2023
from src.data.camer.synthetic import PROMPT_WORDS, SUBTITLE_WORDS
from src.data.components.prompt import DEFAULT_TEMPLATES

_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2}
_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, **_HEADS}

#: model_type -> config kwargs of a tiny model of that family.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt_neox": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    },
    "falcon": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
    "gpt2": {"n_embd": 32, "n_layer": 1, "n_head": 4, "n_positions": 256},
    "gemma": {**_LLAMA_LIKE, "head_dim": 8},
    "gemma2": {**_LLAMA_LIKE, "head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 64},
}

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def corpus() -> list[str]:
    """Running text with the prompt, subtitle and label words, so merges form ``Ġangry``."""
    words = " ".join([*PROMPT_WORDS, *SUBTITLE_WORDS])
    lines = [text.replace("{", " ").replace("}", " ") for text in DEFAULT_TEMPLATES.values()]
    lines += [f"answer : {label} . the answer is {label}" for label in MER2023.labels] * 20
    return [words] * 5 + lines * 5


def bpe_tokenizer(save_dir: str | Path, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (no prefix space, as GPT-2's) and save it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    fast.save_pretrained(str(save_dir))
    return fast


def save_family(model_type: str, save_dir: str | Path, **overrides: Any) -> Path:
    """A local checkpoint directory of a tiny ``model_type`` model with its own tokenizer."""
    save_dir = Path(save_dir)
    tokenizer = bpe_tokenizer(save_dir)
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = AutoConfig.for_model(model_type, **FAMILIES[model_type], **ids, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(save_dir))
    return save_dir
