"""Turns a subtitle and the feature streams into token ids and ``modality_ids``.

The template is text with placeholders: ``{<stream name>}`` for each stream's feature tokens,
``{subtitle}`` and ``{labels}`` (the label list). Literal text is tokenised; each stream
placeholder becomes ``stream.tokens`` positions whose embeddings the model's projectors fill.
Those positions hold the pad token id, or a token the backbone reads them by
(``placeholder_tokens``: Qwen2.5-Omni's ``<|AUDIO|>`` and ``<|VIDEO|>``).

Prompts are written as the backbone saw text in pre-training: with the tokenizer's own chat
template when it has one (Qwen, Llama-3, Phi-3, Gemma instruct checkpoints), else Llama-2's
``[INST]`` format (Emotion-LLaMA-style checkpoints, the demo's tokenizer). Answers (label words,
reasoning) are tokenized as they appear in running text after the answer prefix ``answer :``, so
a byte-level BPE scores ``Ġangry`` (one token), not ``a`` + ``ngry``.
"""

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from string import Formatter
from typing import Literal

from transformers import PreTrainedTokenizerBase

from src.core.errors import InvalidInputError
from src.core.modality import Modality
from src.core.streams import StreamSpec

#: Emotion-LLaMA style instruction prompts, one per task.
DEFAULT_TEMPLATES: dict[str, str] = {
    "emotion": (
        "[INST] <video> {face} {video} </video> <audio> {audio} </audio> the person in video "
        "says : {subtitle} which emotion does the person show ? choose one of : {labels} . "
        "[/INST] answer :"
    ),
    "reason": (
        "[INST] <video> {face} {video} </video> <audio> {audio} </audio> the person in video "
        "says : {subtitle} describe the emotional cues in the video and audio and infer the "
        "emotion of the person . [/INST]"
    ),
}


#: The text every answer follows: the end of the emotion prompt (in both prompt formats).
ANSWER_PREFIX = "answer :"

#: The instructions of :data:`DEFAULT_TEMPLATES` as the user turn of a chat template; the
#: assistant turn then starts with the task's answer prefix.
CHAT_INSTRUCTIONS: dict[str, str] = {
    "emotion": (
        "<video> {face} {video} </video> <audio> {audio} </audio> the person in video says : "
        "{subtitle} which emotion does the person show ? choose one of : {labels} ."
    ),
    "reason": (
        "<video> {face} {video} </video> <audio> {audio} </audio> the person in video says : "
        "{subtitle} describe the emotional cues in the video and audio and infer the emotion of "
        "the person ."
    ),
}
CHAT_ANSWER_PREFIXES: dict[str, str] = {"emotion": ANSWER_PREFIX, "reason": ""}

PromptFormat = Literal["auto", "chat", "inst"]
_SENTINEL = "MOSEAR_PROMPT_CONTENT"


#: The stream placeholders of the built-in templates (MER2023's three feature streams).
BUILTIN_STREAMS = ("face", "video", "audio")


def only_streams(template: str, present: set[str]) -> str:
    """A built-in ``template`` without the placeholders (and the space before each) of the
    built-in streams that are not in ``present``."""
    for name in BUILTIN_STREAMS:
        if name not in present:
            template = template.replace(" {" + name + "}", "").replace("{" + name + "}", "")
    return template


def chat_templates(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """:data:`CHAT_INSTRUCTIONS` wrapped in the tokenizer's chat template (one user turn and the
    generation prompt), followed by each task's answer prefix; BOS is left to the builder."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: use "
            "data.prompt_format inst (or auto)"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
    )
    prefix, suffix = rendered.split(_SENTINEL)
    bos = tokenizer.bos_token
    if bos and prefix.startswith(bos):
        prefix = prefix[len(bos) :]  # the builder adds BOS itself

    def escape(text: str) -> str:
        return text.replace("{", "{{").replace("}", "}}")

    return {
        task: escape(prefix) + instruction + escape(suffix) + CHAT_ANSWER_PREFIXES[task]
        for task, instruction in CHAT_INSTRUCTIONS.items()
    }


def uses_chat_template(
    tokenizer: PreTrainedTokenizerBase, prompt_format: PromptFormat, templates: object
) -> bool:
    """Whether prompts go through the chat template: ``chat``, or ``auto`` with the default
    templates and a tokenizer that has one."""
    if prompt_format not in ("auto", "chat", "inst"):
        raise InvalidInputError(f"data.prompt_format: {prompt_format!r} is not auto, chat or inst")
    if prompt_format == "auto":
        return templates is None and bool(getattr(tokenizer, "chat_template", None))
    return prompt_format == "chat"


@dataclass
class EncodedPrompt:
    """Token ids of one prompt with, per position, its modality and its stream (-1 for text)."""

    input_ids: list[int]
    modality_ids: list[int]
    stream_ids: list[int]


def placeholder_ids(
    tokenizer: PreTrainedTokenizerBase,
    streams: Sequence[StreamSpec],
    placeholder_tokens: dict[str, str] | None = None,
) -> list[int]:
    """The token id each stream's feature positions hold, in stream order: the id of the token
    string ``placeholder_tokens`` names for the stream (``{stream name: token}``), else the pad
    id (the positions are filled, so the id is never embedded unless a backbone reads it)."""
    tokens = dict(placeholder_tokens or {})
    names = [s.name for s in streams]
    unknown = sorted(set(tokens) - set(names))
    if unknown:
        raise InvalidInputError(
            f"data.placeholder_tokens: {unknown} are not streams (the streams are {names})"
        )
    vocab = tokenizer.get_vocab()  # added special tokens included
    for name, token in tokens.items():
        if token not in vocab:
            where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise InvalidInputError(
                f"data.placeholder_tokens: {token!r} (stream {name!r}) is not a token of the "
                f"tokenizer {where}"
            )
    return [vocab[tokens[n]] if n in tokens else tokenizer.pad_token_id for n in names]


class PromptBuilder:
    """Builds prompts and answer targets for one tokenizer, stream set and label list.

    Args:
        tokenizer: Tokenizer of the backbone.
        streams: Feature streams; each must appear exactly once in every template.
        labels: Label words listed in the instruction.
        templates: Prompt template per task (``emotion``, ``reason``).
        prompt_format: ``auto``: the tokenizer's chat template when it has one and
            ``templates`` is unset, else ``[INST]``; ``chat`` or ``inst`` to force one.
        placeholder_tokens: Stream name -> the token string its feature positions hold
            (:func:`placeholder_ids`); streams not named hold the pad id.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        streams: list[StreamSpec],
        labels: list[str],
        templates: dict[str, str] | None = None,
        prompt_format: PromptFormat = "auto",
        placeholder_tokens: dict[str, str] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.streams = list(streams)
        #: The token id of each stream's feature positions, in stream order.
        self.placeholder_ids = placeholder_ids(tokenizer, self.streams, placeholder_tokens)
        self.labels = list(labels)
        label_answer_ids(tokenizer, self.labels)  # refuses labels the tokenizer cannot tell apart
        #: Whether the prompts are the tokenizer's chat template (whitespace is then kept).
        self.chat = uses_chat_template(tokenizer, prompt_format, templates)
        # The built-in templates name the MER2023 streams; a data set without one of them
        # (a world with one visual stream) gets them without its placeholder. A user's own
        # templates are taken as written.
        present = {s.name for s in self.streams}
        if self.chat:
            builtin = {k: only_streams(v, present) for k, v in chat_templates(tokenizer).items()}
            self.templates = {**builtin, **(templates or {})}
        elif templates is None:
            self.templates = {k: only_streams(v, present) for k, v in DEFAULT_TEMPLATES.items()}
        else:
            self.templates = dict(templates)
        self._stream_index = {s.name: i for i, s in enumerate(self.streams)}
        # Token ids per text piece and per answer: the collator asks for the same template
        # pieces, label words and (every epoch) subtitles again and again, and the tokenizer
        # is the hot path of collation. Plain dicts (picklable for spawned workers), bounded.
        self._piece_ids: dict[str, tuple[int, ...]] = {}
        self._answer_ids: dict[str, tuple[int, ...]] = {}
        for task, template in self.templates.items():
            fields = [f for _, f, _, _ in Formatter().parse(template) if f is not None]
            for stream in self.streams:
                if fields.count(stream.name) != 1:
                    raise ValueError(
                        f"prompt template {task!r} must contain {{{stream.name}}} exactly once"
                    )
            unknown = set(fields) - set(self._stream_index) - {"subtitle", "labels"}
            if unknown:
                raise ValueError(f"prompt template {task!r} has unknown placeholders {unknown}")

    def _text_ids(self, text: str) -> list[int]:
        # Only the whitespace next to the feature placeholders goes (each piece is tokenized
        # alone, as MiniGPT-v2 tokenizes the segments between its placeholders); inside a
        # piece the template is kept exactly: a chat template's newlines, and Emotion-LLaMA's
        # double spaces before `[emotion]` and `[/INST]`, change the token ids.
        text = text.strip(" ") if self.chat else text.strip()
        if not text:
            return []
        ids = self._piece_ids.get(text)
        if ids is None:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            _remember(self._piece_ids, text, ids)
        return list(ids)

    def encode(self, subtitle: str, task: str = "emotion") -> EncodedPrompt:
        """Token ids, modality ids and stream ids of the prompt for one sample."""
        if task not in self.templates:
            raise ValueError(f"no prompt template for task {task!r}; have {list(self.templates)}")
        ids: list[int] = []
        modality: list[int] = []
        stream_ids: list[int] = []
        if self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            modality.append(int(Modality.TEXT))
            stream_ids.append(-1)
        values = {"subtitle": " ".join(subtitle.split()), "labels": " , ".join(self.labels)}
        # Text between two feature placeholders (literals, subtitle, labels) is tokenized in
        # one piece, as running text.
        text = ""
        for literal, field, _, _ in Formatter().parse(self.templates[task]):
            text += literal + (values[field] if field in values else "")
            if field in self._stream_index or field is None:
                piece = self._text_ids(text)
                text = ""
                ids += piece
                modality += [int(Modality.TEXT)] * len(piece)
                stream_ids += [-1] * len(piece)
            if field in self._stream_index:
                stream = self.streams[self._stream_index[field]]
                ids += [self.placeholder_ids[self._stream_index[field]]] * stream.tokens
                modality += [int(stream.modality_id)] * stream.tokens
                stream_ids += [self._stream_index[field]] * stream.tokens
        if text:  # a template ending in {subtitle} or {labels}
            piece = self._text_ids(text)
            ids += piece
            modality += [int(Modality.TEXT)] * len(piece)
            stream_ids += [-1] * len(piece)
        return EncodedPrompt(ids, modality, stream_ids)

    def answer_ids(self, text: str) -> list[int]:
        """Token ids of an answer (a label word or a reasoning text) followed by EOS."""
        ids = self._answer_ids.get(text)
        if ids is None:
            ids = tuple(encode_answer(self.tokenizer, text))
            _remember(self._answer_ids, text, ids)
        return list(ids)


#: Texts a :class:`PromptBuilder` keeps the token ids of, per cache: the template pieces and
#: label words, and the subtitle pieces of a data set up to this size (about 3 KB each for an
#: 80-token piece, so under 50 MB); beyond it, a text is tokenized each time. The first texts
#: stay, so the template pieces are always kept.
TOKEN_CACHE_SIZE = 16_384


def _remember(cache: dict[str, tuple[int, ...]], text: str, ids: tuple[int, ...]) -> None:
    if len(cache) < TOKEN_CACHE_SIZE:
        cache[text] = ids


def encode_answer(
    tokenizer: PreTrainedTokenizerBase, text: str, context: str = ANSWER_PREFIX
) -> list[int]:
    """Token ids of an answer (a label word or a reasoning text) followed by EOS, as the answer
    is tokenized in running text after ``context`` (one space between them): a byte-level BPE
    gives ``Ġangry``, a SentencePiece ``▁angry``, a word-level tokenizer ``angry``."""
    text = " ".join(text.split())
    if not text:
        raise ValueError("an answer must not be empty")
    before = tokenizer(context, add_special_tokens=False)["input_ids"]
    joined = tokenizer(f"{context} {text}", add_special_tokens=False)["input_ids"]
    if joined[: len(before)] == before:
        ids = joined[len(before) :]
    else:  # the context's last token merged with the answer's first: the answer alone
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("an answer must not be empty")
    return ids + [tokenizer.eos_token_id]


class LabelCollisionError(InvalidInputError):
    """Two or more label words encode to the same answer token ids: closed-set scoring would
    give them the same score and could never tell them apart."""


def label_answer_ids(tokenizer: PreTrainedTokenizerBase, labels: Sequence[str]) -> list[list[int]]:
    """The answer token ids of every label word; raises :class:`LabelCollisionError` naming the
    tokenizer and the words when some encode alike (e.g. words unknown to it become ``<unk>``).
    """
    ids = [encode_answer(tokenizer, label) for label in labels]
    alike: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for label, answer in zip(labels, ids, strict=True):
        alike[tuple(answer)].append(label)
    clashes = [(answer, words) for answer, words in alike.items() if len(words) > 1]
    if clashes:
        where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        details = "; ".join(
            f"{', '.join(repr(w) for w in words)} all encode to {list(answer)} "
            f"({' '.join(tokenizer.convert_ids_to_tokens(list(answer)))})"
            for answer, words in clashes
        )
        raise LabelCollisionError(
            f"tokenizer {where}: labels: {details}; closed-set scoring cannot tell these labels "
            "apart. Use the backbone's own tokenizer, one whose vocabulary has these words, or "
            "other label words (data.label_space)"
        )
    return ids
