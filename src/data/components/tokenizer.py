"""Local tokenizers: a word-level one trained on a closed vocabulary, or a checkpoint's own.

Tiny demo models have no checkpoint to bring a tokenizer, so the synthetic data set trains a
word-level tokenizer on its own vocabulary (prompt template, subtitles, label words) with the
``tokenizers`` library and saves it beside the data. Real checkpoints bring their own tokenizer in
their local directory. Nothing is downloaded.
"""

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from src.core.errors import InvalidInputError
from src.io.local_weights import resolve_local

SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
}


def build_word_tokenizer(words: Iterable[str], save_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a lower-casing word-level tokenizer over ``words`` and save it to ``save_dir``."""
    specials = list(SPECIAL_TOKENS.values())
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for word in sorted({w.lower() for w in words} - set(specials)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # BOS is added by the prompt builder, so the tokenizer adds nothing on its own.
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.save_pretrained(str(save_dir))
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or a hub id in the local Hugging Face cache; a
    missing one fails in one line saying how to get it (``hf download``)."""
    # A directory, or a hub id already in the local Hugging Face cache (never downloaded).
    path = resolve_local(path, "data.tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:  # missing, empty or corrupt tokenizer files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidInputError(
            f"{path}: data.tokenizer_path: cannot load a tokenizer from this directory ({reason})"
        ) from err
    if tokenizer.pad_token is None:
        # LLaMA tokenizers ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def unknown_words(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> Counter[str]:
    """How often each whitespace-separated word of ``texts`` encodes to the unknown token.

    Empty for tokenizers without an unknown token or that never use it (byte-level BPE,
    SentencePiece with byte fallback).
    """
    unk = tokenizer.unk_token_id
    counts = Counter(word for text in texts for word in text.split())
    if unk is None or not counts:
        return Counter()
    words = list(counts)
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    return Counter({w: counts[w] for w, ids in zip(words, encoded, strict=True) if unk in ids})
