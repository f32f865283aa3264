"""Prompts and labels as a pretrained model saw text: chat templates, label words in context."""

import pytest

from src.core.label_space import MER2023
from src.core.streams import StreamSpec
from src.data.camer.synthetic import PROMPT_WORDS, SUBTITLE_WORDS
from src.data.components.prompt import ANSWER_PREFIX, PromptBuilder, label_answer_ids
from src.data.components.tokenizer import build_word_tokenizer
from tests.families import bpe_tokenizer

STREAMS = [
    StreamSpec(name="face", feature_dir="f", modality="visual", dim=4, tokens=2),
    StreamSpec(name="video", feature_dir="v", modality="visual", dim=4, tokens=1),
    StreamSpec(name="audio", feature_dir="a", modality="audio", dim=4, tokens=1),
]
LABELS = list(MER2023.labels)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def bpe(tmp_path):
    return bpe_tokenizer(tmp_path / "bpe")


def text_of(builder: PromptBuilder, subtitle: str) -> str:
    prompt = builder.encode(subtitle)
    ids = [i for i, s in zip(prompt.input_ids, prompt.stream_ids, strict=True) if s < 0]
    return builder.tokenizer.decode(ids)


def test_chat_template_renders_the_prompt(bpe):
    bpe.chat_template = CHATML
    builder = PromptBuilder(bpe, STREAMS, LABELS)
    assert builder.chat
    text = text_of(builder, "i went   home .")
    assert text.startswith("<s><|im_start|>user\n<video></video> <audio></audio> the person")
    assert "says : i went home . which emotion" in text and "[INST]" not in text
    assert text.endswith(f"<|im_end|>\n<|im_start|>assistant\n{ANSWER_PREFIX}")
    prompt = builder.encode("i went home .")
    assert prompt.stream_ids.count(0) == 2 and prompt.stream_ids.count(2) == 1


def test_inst_format_without_chat_template_or_when_asked(bpe):
    assert "[INST]" in text_of(PromptBuilder(bpe, STREAMS, LABELS), "hello .")
    bpe.chat_template = CHATML
    forced = PromptBuilder(bpe, STREAMS, LABELS, prompt_format="inst")
    assert not forced.chat and "[INST]" in text_of(forced, "hello .")
    custom = {"emotion": "{face} {video} {audio} {subtitle} {labels} answer :"}
    assert not PromptBuilder(bpe, STREAMS, LABELS, templates=custom).chat


def test_label_tokens_equal_the_running_text_after_the_answer_prefix(bpe):
    """Scoring and running text agree: ``angry`` is ``Ġangry``, never ``a`` + ``ngry``."""
    answers = label_answer_ids(bpe, LABELS)
    for label, ids in zip(LABELS, answers, strict=True):
        prompt = bpe(f"which emotion ? {ANSWER_PREFIX}", add_special_tokens=False)["input_ids"]
        running = bpe(f"which emotion ? {ANSWER_PREFIX} {label}", add_special_tokens=False)
        assert running["input_ids"][len(prompt) :] + [bpe.eos_token_id] == ids, label
    angry = bpe.convert_ids_to_tokens(answers[LABELS.index("angry")][:-1])
    assert angry == ["Ġangry"]
    assert bpe.convert_ids_to_tokens(bpe("angry", add_special_tokens=False)["input_ids"]) != angry
    # Training targets are the same ids the scoring uses.
    builder = PromptBuilder(bpe, STREAMS, LABELS)
    assert [builder.answer_ids(label) for label in LABELS] == answers


def test_demo_word_tokenizer_keeps_its_label_ids(tmp_path):
    words = [*PROMPT_WORDS, *SUBTITLE_WORDS, *LABELS]
    tokenizer = build_word_tokenizer(words, tmp_path / "word")
    answers = label_answer_ids(tokenizer, LABELS)
    assert answers == [[tokenizer.convert_tokens_to_ids(w), tokenizer.eos_token_id] for w in LABELS]
    assert not PromptBuilder(tokenizer, STREAMS, LABELS).chat


def test_repeated_prompts_and_answers_reuse_their_token_ids(bpe):
    """Collation asks for the same pieces every epoch: the tokenizer runs once per text, and the
    ids (fresh lists each time) equal those of a builder that never saw the text."""
    builder = PromptBuilder(bpe, STREAMS, LABELS)
    first, first_answer = builder.encode("i went home ."), builder.answer_ids("happy")
    calls = []
    original = builder.tokenizer

    class Counting:
        def __getattr__(self, name):
            return getattr(original, name)

        def __call__(self, *args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

    builder.tokenizer = Counting()
    again, again_answer = builder.encode("i went home ."), builder.answer_ids("happy")
    assert calls == []
    assert again == first and again_answer == first_answer
    again.input_ids.append(-7)
    again_answer.append(-7)
    fresh = PromptBuilder(original, STREAMS, LABELS)
    assert builder.encode("i went home .") == fresh.encode("i went home .") == first
    assert builder.answer_ids("happy") == fresh.answer_ids("happy") == first_answer
    builder.encode("she stayed .")
    assert calls  # a new subtitle is tokenized


def test_the_builtin_prompts_name_only_the_streams_a_data_set_has(bpe):
    """A world with one visual stream (``face``) and audio: the built-in templates drop
    ``{video}`` in both formats; a user's own template naming a missing stream is refused."""
    face_audio = [STREAMS[0], STREAMS[2]]
    for tokenizer_has_chat in (False, True):
        bpe.chat_template = CHATML if tokenizer_has_chat else None
        builder = PromptBuilder(bpe, face_audio, LABELS)
        prompt = builder.encode("i went home .")
        assert [s for s in prompt.stream_ids if s >= 0] == [0, 0, 1]
        assert "<video></video> <audio></audio>" in text_of(builder, "i went home .")
    with pytest.raises(ValueError, match="unknown placeholders {'video'}"):
        PromptBuilder(bpe, face_audio, LABELS, {"emotion": "{face} {video} {audio} answer :"})


def test_inst_whitespace_inside_a_piece_is_kept_as_written(bpe):
    """Emotion-LLaMA's released prompt has two spaces before ``[/INST]``: a byte-level BPE
    gives them their own token, so collapsing them would change the ids."""
    template = {"emotion": "[INST] {face} {video} {audio} says : {subtitle} .  [/INST]"}
    builder = PromptBuilder(bpe, STREAMS, LABELS, template, "inst")
    assert text_of(builder, "i  went home") == "<s>[INST]says : i went home .  [/INST]"
