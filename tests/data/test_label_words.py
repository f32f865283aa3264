"""Label words and subtitles against the tokenizer: labels it encodes alike are refused at setup
(closed-set scoring could not tell them apart); unknown subtitle words are counted and reported."""

import csv
import warnings

import pytest

from src.core.label_space import MERR
from src.core.streams import StreamSpec
from src.data.camer.datamodule import CAMERDataModule
from src.data.camer.synthetic import SyntheticCAMERConfig, generate_synthetic_camer
from src.data.components.prompt import LabelCollisionError
from src.models.backbones.projected_causal_lm import ProjectedCausalLM
from src.models.emotion_module import EmotionLLMModule
from tests.fault_injection import expect_user_error, tiny_config

STREAMS = [
    StreamSpec("face", "mae_340_UTT", "visual", 8, 2),
    StreamSpec("video", "maeV_399_UTT", "visual", 8, 2),
    StreamSpec("audio", "HL-UTT", "audio", 8, 1),
]
SMALL = SyntheticCAMERConfig(seed=0, n_train=10, n_val=4, n_test=6)
TINY_LLAMA = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}


def assert_names_the_clash(err: LabelCollisionError, tokenizer: str) -> None:
    message = str(err)
    # The synthetic tokenizer knows MER2023's six words only: MERR's other three become <unk>.
    for word in ("'fear'", "'doubt'", "'contempt'", "<unk>", tokenizer, "labels"):
        assert word in message, message
    for word in ("'happy'", "'neutral'"):
        assert word not in message, message


def test_labels_the_tokenizer_encodes_alike_are_refused_naming_them(tmp_path):
    root = generate_synthetic_camer(tmp_path / "camer", STREAMS, SMALL)
    tokenizer = str(root / "tokenizer")
    with pytest.raises(LabelCollisionError) as info:
        CAMERDataModule(str(root), streams=STREAMS, label_space="merr").setup("fit")
    assert_names_the_clash(info.value, tokenizer)
    with pytest.raises(LabelCollisionError) as info:  # the model side refuses them too
        EmotionLLMModule(
            backbone=ProjectedCausalLM(config=TINY_LLAMA),
            tokenizer=tokenizer,
            labels=list(MERR.labels),
            streams=STREAMS,
        )
    assert_names_the_clash(info.value, tokenizer)
    data = CAMERDataModule(str(root), streams=STREAMS, label_space="mer2023")
    data.setup("fit")  # words the tokenizer knows pass
    assert len(data.datasets["train"]) == SMALL.n_train


def test_the_cli_refuses_colliding_labels_before_training(workdir, capsys):
    config = tiny_config(workdir)
    line = expect_user_error(
        capsys, ["fit", "--config", str(config), "--data.init_args.label_space", "merr"]
    )
    for word in ("'fear'", "'doubt'", "'contempt'", "data/camer_tiny/tokenizer"):
        assert word in line, line
    assert not (workdir / "outputs").exists()  # nothing trained, no checkpoint


def test_unknown_subtitle_words_are_counted_and_reported(tmp_path):
    root = generate_synthetic_camer(tmp_path / "camer", STREAMS, SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean data set reports nothing
        clean = CAMERDataModule(str(root), streams=STREAMS)
        clean.setup("fit")
    assert clean.unknown_subtitle_words == {}

    path = root / "transcription.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    rows[0]["english"] = "zebra went house ."
    rows[1]["english"] = "the Quokka saw a ZEBRA"  # the tokenizer lower-cases: still unknown
    rows[2]["english"] = "Went House"  # known words in another case
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "english"])
        writer.writeheader()
        writer.writerows(rows)
    total = sum(len(r["english"].split()) for r in rows)
    module = CAMERDataModule(str(root), streams=STREAMS)
    pattern = rf"3 of {total} subtitle words \(3 distinct\) are unknown to the tokenizer"
    with pytest.warns(UserWarning, match=pattern) as record:
        module.setup("fit")
    assert module.unknown_subtitle_words == {"zebra": 1, "Quokka": 1, "ZEBRA": 1}
    message = next(str(w.message) for w in record if "subtitle words" in str(w.message))
    assert "'zebra' x1" in message and str(root / "tokenizer") in message and "<unk>" in message
