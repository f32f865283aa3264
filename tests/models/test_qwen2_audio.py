"""Qwen2-Audio plus frames as a backbone: a tiny random Qwen2-Audio saved with
``save_pretrained`` beside a byte-level BPE tokenizer with a ChatML chat template and its
feature extractor (all made here, nothing downloaded); its audio positions hold exactly the
model's own audio features for its processor's log-mels, its frame positions a trainable
projector's tokens, and the real CLI fits it with LoRA and MoSE (its LM only) and tests it with
AR (its LM only)."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2ForCausalLM,
    WhisperFeatureExtractor,
)

from src.cli import main
from src.core.errors import InvalidInputError
from src.core.modality import Modality
from src.core.streams import StreamSpec
from src.data.camer.datamodule import SyntheticCAMERDataModule
from src.data.camer.synthetic import SyntheticCAMERConfig
from src.data.components.tokenizer import load_tokenizer
from src.models.backbones.qwen2_audio import Qwen2AudioWithFrames, silence_value
from src.models.backbones.qwen_omni import pack_audio, unpack_audio
from src.models.mose import mose_layers
from src.models.qwen2_audio_inputs import Qwen2AudioInput
from tests.conftest import REPO, TINY_CONFIG
from tests.fault_injection import expect_user_error
from tests.mini_mer import write_mer2023
from tests.models.test_encoders import VISION
from tests.models.test_qwen_omni import AR, MOSE, SHORT, adapted, chatml_tokenizer

MELS, AUDIO_TOKENS = 16, 4  # 16 mel bins, 16 mel frames -> 4 audio tokens
POSITIONS = 50  # the tiny tower's max_source_positions: it takes 100 frames (1 s)
FRAME_DIM, FRAME_TOKENS = VISION["hidden_size"], 4  # the tiny CLIP's patch width, 4 bands
AUDIO_DIM = 4 * MELS
LAYER = REPO / "conf/experiment/qwen2_audio.yaml"
TEMPLATES = yaml.safe_load(LAYER.read_text())["data"]["init_args"]["templates"]
PLACEHOLDERS = yaml.safe_load(LAYER.read_text())["data"]["init_args"]["placeholder_tokens"]
STREAMS = [
    {"name": "frames", "feature_dir": "clip_vit_frames", "modality": "visual",
     "dim": FRAME_DIM, "tokens": FRAME_TOKENS, "sequence": True},
    {"name": "audio", "feature_dir": "qwen2_audio_mels", "modality": "audio",
     "dim": AUDIO_DIM, "tokens": AUDIO_TOKENS, "sequence": True},
]  # fmt: skip


def write_qwen2_audio_dir(save_dir: Path) -> Path:
    """A local Qwen2-Audio-like directory: a tiny random model (1-layer audio tower of 100
    input frames, 2-layer Qwen2), its tokenizer (``<|AUDIO|>`` its audio token) and its
    feature extractor (16 mel bins, 1 s chunks)."""
    tokenizer = chatml_tokenizer(save_dir)
    config = Qwen2AudioConfig(
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
        audio_config={"num_mel_bins": MELS, "encoder_layers": 1, "encoder_attention_heads": 2,
                      "encoder_ffn_dim": 32, "d_model": 16, "max_source_positions": POSITIONS},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512},
    )  # fmt: skip
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(str(save_dir))
    WhisperFeatureExtractor(feature_size=MELS, chunk_length=1).save_pretrained(str(save_dir))
    return save_dir


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    return write_qwen2_audio_dir(tmp_path_factory.mktemp("qwen2_audio"))


def built(audio_dir: Path) -> tuple[Qwen2AudioWithFrames, PreTrainedTokenizerFast]:
    tokenizer = load_tokenizer(str(audio_dir))
    backbone = Qwen2AudioWithFrames(path=str(audio_dir))
    backbone.build(tokenizer, [StreamSpec(**s) for s in STREAMS])
    return backbone, tokenizer


def test_it_is_split_along_the_protocol(audio_dir):
    backbone, _ = built(audio_dir)
    assert isinstance(backbone.language_model, Qwen2ForCausalLM)
    assert len(backbone.layers()) == 2  # the Qwen2 decoder layers, not the tower's
    assert backbone.attention_model() is backbone.language_model
    assert backbone.position_ids(torch.zeros(1, 3, dtype=torch.long), None) is None  # RoPE
    lm_modules = {id(m) for m in backbone.language_model.modules()}
    assert not any(id(m) in lm_modules for m in backbone.audio_tower.modules())
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"projectors.frames.net.weight", "projectors.frames.net.bias"}
    groups = backbone.modality_parameters()
    assert set(groups) == {"visual"}
    assert {id(p) for p in groups["visual"]} == {id(p) for p in backbone.projectors.parameters()}
    assert Qwen2AudioWithFrames(**backbone.settings()).settings() == backbone.settings()
    backbone.train()
    assert not backbone.audio_tower.training and backbone.projectors.training
    # What AR switches is the LM's attention only, never the audio tower's (same interface).
    tower = backbone.audio_tower.config._attn_implementation
    backbone.attention_model().set_attn_implementation("eager")
    assert backbone.language_model.model.config._attn_implementation == "eager"
    assert backbone.audio_tower.config._attn_implementation == tower == "sdpa"


def test_the_audio_positions_hold_the_models_own_audio_features(audio_dir):
    """Raw clips -> Qwen2AudioInput -> the backbone equal the released path: the processor's
    feature extractor on the clip (30 s padding, its feature_attention_mask) and the model's
    own forward, whose language model input is read with a forward hook."""
    backbone, tokenizer = built(audio_dir)
    reference = Qwen2AudioForConditionalGeneration.from_pretrained(str(audio_dir)).eval()
    encoder = Qwen2AudioInput(str(audio_dir), tokens=AUDIO_TOKENS)
    torch.manual_seed(1)
    waves = torch.randn(2, 4000) * torch.tensor([[1.0], [0.01]])
    lengths = torch.tensor([4000, 1500])  # one clip cut, one zero-padded
    rows = encoder(waves, lengths)
    clips = [
        waves[0, : encoder.samples],
        torch.cat([waves[1, :1500], torch.zeros(encoder.samples - 1500)]),
    ]
    extractor = WhisperFeatureExtractor.from_pretrained(str(audio_dir))
    processed = extractor(
        [c.numpy() for c in clips],
        sampling_rate=16000,
        return_attention_mask=True,
        padding="max_length",
        return_tensors="pt",
    )
    mels = processed.input_features
    assert mels.shape == (2, MELS, 2 * POSITIONS)
    assert torch.allclose(unpack_audio(rows, MELS), mels[:, :, : 4 * AUDIO_TOKENS])
    # The extractor's frames after the clip are its silence value, which the backbone pads with.
    after = mels[:, :, 4 * AUDIO_TOKENS :]
    assert torch.allclose(after, silence_value(mels[:, :, : 4 * AUDIO_TOKENS])[:, None, None])

    # A prompt as the processor writes it: text, <|audio_bos|>, 4 x <|AUDIO|>, <|audio_eos|>,
    # text, then the frames' positions (pad ids), text.
    ids = tokenizer("i went home .", add_special_tokens=False).input_ids
    bos, eos = tokenizer.convert_tokens_to_ids(["<|audio_bos|>", "<|audio_eos|>"])
    pad = tokenizer.pad_token_id
    row = [*ids, bos, *[backbone.audio_token_id] * AUDIO_TOKENS, eos, *ids,
           *[pad] * FRAME_TOKENS, *ids]  # fmt: skip
    input_ids = torch.tensor([row, row])
    stream_ids = torch.full_like(input_ids, -1)
    stream_ids[input_ids == backbone.audio_token_id] = 1
    start = len(ids) * 2 + AUDIO_TOKENS + 2
    stream_ids[:, start : start + FRAME_TOKENS] = 0
    frames = torch.randn(2, FRAME_TOKENS, FRAME_DIM)
    with torch.no_grad():
        embeds = backbone.embed(input_ids, stream_ids, {"audio": rows, "frames": frames})
        seen = {}
        hook = reference.model.language_model.register_forward_pre_hook(
            lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True
        )
        reference(input_ids=input_ids, input_features=mels,
                  feature_attention_mask=processed.attention_mask)  # fmt: skip
        hook.remove()
        theirs = seen["inputs_embeds"]
        audio = input_ids == backbone.audio_token_id
        assert torch.allclose(embeds[audio], theirs[audio], atol=1e-5)
        text = stream_ids < 0
        assert torch.equal(embeds[text], theirs[text])
        projected = backbone.projectors["frames"](frames).flatten(0, 1)
        assert torch.allclose(embeds[stream_ids == 0], projected)
        # The padding matters: the tower's last attended position reads the frame after the
        # clip, and every position attends to it; zeros there (not silence) change the tokens.
        zeroed = mels.clone()
        zeroed[:, :, 4 * AUDIO_TOKENS :] = 0.0
        hook = reference.model.language_model.register_forward_pre_hook(
            lambda _, args, kwargs: seen.update(kwargs), with_kwargs=True
        )
        reference(input_ids=input_ids, input_features=zeroed,
                  feature_attention_mask=processed.attention_mask)  # fmt: skip
        hook.remove()
        wrong = seen["inputs_embeds"][audio].view(2, AUDIO_TOKENS, -1)
        ours = embeds[audio].view(2, AUDIO_TOKENS, -1)
        assert (ours - wrong).abs().amax(dim=(0, 2)).min() > 1e-4  # each token
        # The LM is the model's own text model + head: same logits on the same embeddings.
        logits = backbone.language_model(inputs_embeds=embeds).logits
        assert torch.allclose(logits, reference(inputs_embeds=embeds).logits, atol=1e-5)
    # It generates (greedy, with its cache) after the filled embeddings, as the model does.
    mask = torch.ones_like(input_ids)
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": pad}
    ours = backbone.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
    theirs = reference.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
    assert ours.shape == (2, 3) and torch.equal(ours, theirs[:, -3:])


def test_a_prompt_without_its_audio_token_is_refused(audio_dir):
    backbone, tokenizer = built(audio_dir)
    stream_ids = torch.tensor([[-1, *[0] * FRAME_TOKENS, *[1] * AUDIO_TOKENS, -1]])
    input_ids = torch.full_like(stream_ids, tokenizer.pad_token_id)
    features = {"frames": torch.randn(1, FRAME_TOKENS, FRAME_DIM),
                "audio": pack_audio(torch.randn(1, MELS, 4 * AUDIO_TOKENS))}  # fmt: skip
    with pytest.raises(
        InvalidInputError, match=r"data.placeholder_tokens \{audio: '<\|AUDIO\|>'\}"
    ):
        backbone.embed(input_ids, stream_ids, features)  # pad ids at the audio positions
    input_ids[stream_ids == 1] = backbone.audio_token_id
    input_ids[0, 0] = backbone.audio_token_id  # one more, at a text position
    with pytest.raises(InvalidInputError, match="nothing else does"):
        backbone.embed(input_ids, stream_ids, features)
    input_ids[0, 0] = tokenizer.pad_token_id
    with torch.no_grad():
        assert backbone.embed(input_ids, stream_ids, features).shape == (*input_ids.shape, 32)


def audio_datamodule(audio_dir: Path, **options) -> SyntheticCAMERDataModule:
    options = {"placeholder_tokens": PLACEHOLDERS, **options}
    return SyntheticCAMERDataModule(
        root="data/camer_qwen2_audio_small",
        synthetic=SyntheticCAMERConfig(n_train=4, n_val=4, n_test=6),
        tokenizer=str(audio_dir), streams=[StreamSpec(**s) for s in STREAMS],
        templates=TEMPLATES, prompt_format="chat", eval_batch_size=6, **options,
    )  # fmt: skip


def test_its_audio_positions_hold_its_token_id_and_modality_ids_follow(audio_dir, workdir):
    data = audio_datamodule(audio_dir)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    backbone, _ = built(audio_dir)
    tokenizer = data.collator.prompt_builder.tokenizer
    audio_id = tokenizer.convert_tokens_to_ids(PLACEHOLDERS["audio"])
    assert backbone.audio_token_id == audio_id
    ids, streams = batch["input_ids"], batch["stream_ids"]
    assert (ids[streams == 1] == audio_id).all()
    assert int((ids == audio_id).sum()) == AUDIO_TOKENS * len(ids)
    assert (ids[streams == 0] == tokenizer.pad_token_id).all()  # the frames keep the pad id
    # Each audio block sits inside <|audio_bos|> ... <|audio_eos|>, as the processor writes it.
    bos, eos = tokenizer.convert_tokens_to_ids(["<|audio_bos|>", "<|audio_eos|>"])
    for row in ids:
        where = (row == audio_id).nonzero().flatten()
        assert row[where[0] - 1] == bos and row[where[-1] + 1] == eos
    # The batch's modality_ids (what AR and MoSE read) are what the token ids say on text and
    # audio, and visual at the frames' positions.
    real = batch["modality_ids"] != int(Modality.PAD)
    told = real & (streams != 0)
    assert torch.equal(batch["modality_ids"][told], backbone.modality_ids(ids)[told])
    assert (batch["modality_ids"][streams == 0] == int(Modality.VISUAL)).all()
    with torch.no_grad():
        assert backbone.embed(ids, streams, batch["features"]).shape[:2] == ids.shape


def config_file(folder: Path, audio_dir: Path) -> str:
    """The tiny test config with Qwen2-Audio plus frames and the layer's prompts."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["model"]["init_args"]["backbone"] = {
        "class_path": "src.models.backbones.qwen2_audio.Qwen2AudioWithFrames",
        "init_args": {"path": str(audio_dir)},
    }
    data = config["data"]["init_args"]
    data.update(root="data/camer_qwen2_audio", tokenizer=str(audio_dir), streams=STREAMS,
                templates=TEMPLATES, prompt_format="chat", batch_size=8,
                placeholder_tokens=PLACEHOLDERS)  # fmt: skip
    path = folder / "qwen2_audio.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_wrong_stream_or_missing_placeholder_is_one_line(audio_dir, workdir, capsys):
    config = config_file(workdir, audio_dir)
    wrong = [dict(s, dim=AUDIO_DIM + 1) if s["name"] == "audio" else s for s in STREAMS]
    streams = yaml.safe_dump(wrong, default_flow_style=True).strip()
    line = expect_user_error(capsys, ["test", "--config", config, "--allow_untrained", "true",
                                      "--data.init_args.streams", streams])  # fmt: skip
    assert "stream 'audio': Qwen2-Audio takes its feature extractor's log-mels" in line
    assert f"dim {AUDIO_DIM} and at most {POSITIONS // 2} tokens" in line
    line = expect_user_error(capsys, ["test", "--config", config, "--allow_untrained", "true",
                                      "--data.init_args.root", "data/camer_qwen2_audio_pad",
                                      "--data.init_args.placeholder_tokens", "null"])  # fmt: skip
    assert "set data.placeholder_tokens {audio: '<|AUDIO|>'}" in line


@pytest.mark.slow
def test_lora_and_mose_fit_its_lm_and_ar_tests_its_lm(audio_dir, workdir):
    config = config_file(workdir, audio_dir)
    lora = main(["fit", "--config", config, *SHORT, "--test_after_fit", "false"])
    assert lora.trainer.state.finished and lora.trainer.global_step == 2
    backbone = lora.model.model.backbone
    assert type(backbone).__name__ == "Qwen2AudioWithFrames"
    names = adapted(backbone, "lora_A")
    assert names and all(".layers." in n and "self_attn" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    assert not any("lora_" in n for n, _ in backbone.audio_tower.named_parameters())
    best = lora.trainer.checkpoint_callback.best_model_path
    saved = torch.load(best, weights_only=True)["state_dict"]
    assert any("lora_A" in k for k in saved) and any("projectors.frames" in k for k in saved)
    assert not any("audio_tower" in k or "embed_tokens" in k for k in saved)  # frozen: rebuilt

    tested = main(["test", "--config", config, *AR, "--ckpt_path", best])
    metrics = tested.trainer.callback_metrics
    before = float(metrics["test/attn_share_before/audio"])
    assert 0.0 < float(metrics["test/attn_share/audio"]) < before  # AR acted on its LM
    for subset in ("video_aligned", "audio_aligned", "consistent"):
        assert f"test/{subset}/acc" in metrics

    mose = main(["fit", "--config", config, "--config", MOSE, *SHORT, "--test_after_fit", "false"])
    assert mose.trainer.state.finished
    lm = mose.model.model.language_model
    assert {n.rsplit(".", 1)[-1] for n, _ in mose_layers(lm)} == {"q_proj", "v_proj"}
    tower = mose.model.model.backbone.audio_tower
    assert not any("lora_" in n or "mose" in n.lower() for n, _ in tower.named_parameters())


def test_the_audio_input_is_the_processors_own_log_mels(audio_dir):
    encoder = Qwen2AudioInput(str(audio_dir), tokens=AUDIO_TOKENS)
    assert encoder.feature_dim == AUDIO_DIM
    assert encoder.samples == 4 * AUDIO_TOKENS * 160 - 200  # half a 400-sample window short
    waves = torch.randn(3, 5000)
    rows = encoder(waves, torch.tensor([5000, 2000, 100]))
    assert rows.shape == (3, AUDIO_TOKENS, AUDIO_DIM)
    # A clip shorter than the window is its zero-padded self (same frames as padding it here).
    padded = torch.cat([waves[2, :100], torch.zeros(encoder.samples - 100)])
    assert torch.allclose(encoder(padded[None]), rows[2:])
    with pytest.raises(ValueError, match=r"tokens must be 1\.\.25"):
        Qwen2AudioInput(str(audio_dir), tokens=26)  # 1 s chunks: 25 tokens at most
    with pytest.raises(ValueError, match="not a local directory"):
        Qwen2AudioInput("no/such/dir", tokens=4)


def media_config_file(folder: Path, audio_dir: Path) -> str:
    """:func:`config_file` on the tiny MER2023 clips (``source: media``): 4 frames through a
    tiny CLIP (patch tokens in 4 bands) and the audio through the model's feature extractor."""
    path = Path(config_file(folder, audio_dir))
    config = yaml.safe_load(path.read_text())
    mer = yaml.safe_load((REPO / "tests/conf/mer2023_tiny.yaml").read_text())
    mer["init_args"].update(
        tokenizer=str(audio_dir), streams=STREAMS, templates=TEMPLATES, prompt_format="chat",
        placeholder_tokens=PLACEHOLDERS, source="media",
    )  # fmt: skip
    config["data"] = mer
    config["model"]["init_args"]["encoders"] = {
        "frames": {"class_path": "src.models.encoders.VisualEncoder",
                   "init_args": {"kind": "clip", "config": VISION, "tokens": FRAME_TOKENS}},
        "audio": {"class_path": "src.models.qwen2_audio_inputs.Qwen2AudioInput",
                  "init_args": {"processor": str(audio_dir), "tokens": AUDIO_TOKENS}},
    }  # fmt: skip
    config["trainer"]["callbacks"][0]["init_args"]["monitor"] = "val/acc"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_raw_clips_go_through_its_extractor_tower_and_frame_projector(audio_dir, workdir):
    write_mer2023(workdir / "mer2023_tiny", n_train=8, n_test=3)
    config = media_config_file(workdir, audio_dir)
    fit = main(["fit", "--config", config, *SHORT, "--trainer.limit_val_batches", "1"])
    assert fit.trainer.state.finished and fit.trainer.global_step == 2
    assert "test/acc" in fit.trainer.callback_metrics
    best = fit.trainer.checkpoint_callback.best_model_path
    tested = main(["test", "--config", config, *AR, "--ckpt_path", best])
    metrics = tested.trainer.callback_metrics
    before = float(metrics["test/attn_share_before/audio"])
    assert 0.0 < float(metrics["test/attn_share/audio"]) < before


def layer_args(audio_dir: Path) -> list[str]:
    """conf/experiment/qwen2_audio.yaml with only the directories and the sizes made tiny."""

    streams = yaml.safe_dump(STREAMS, default_flow_style=True).strip()
    clip = audio_dir / "clip"  # a tiny CLIP vision model in place of /models/clip-vit-...
    if not clip.is_dir():
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(str(clip))
    return [
        "--config", str(LAYER),
        "--model.backbone.path", str(audio_dir), "--model.backbone.dtype", "float32",
        "--model.init_args.encoders.frames.init_args.pretrained", str(clip),
        "--model.init_args.encoders.frames.init_args.tokens", str(FRAME_TOKENS),
        "--model.init_args.encoders.audio.init_args.processor", str(audio_dir),
        "--model.init_args.encoders.audio.init_args.tokens", str(AUDIO_TOKENS),
        "--data.init_args.tokenizer", str(audio_dir), "--data.init_args.source", "features",
        "--data.init_args.streams", streams, "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.num_sanity_val_steps", "0",
    ]  # fmt: skip


@pytest.mark.slow
def test_the_7b_layer_runs_with_the_tiny_model_in_its_place(audio_dir, workdir):
    """conf/experiment/qwen2_audio.yaml (+ conf/model/qwen2_audio_7b.yaml) over the
    experiments, as the README runs them: fit, and zero-shot test with calibrated AR."""
    lora = str(REPO / "conf/experiment/lora.yaml")
    fit = main(["fit", "--config", lora, *layer_args(audio_dir), "--trainer.max_steps", "1",
                "--test_after_fit", "false"])  # fmt: skip
    assert fit.trainer.state.finished and fit.trainer.global_step == 1
    assert type(fit.model.model.backbone).__name__ == "Qwen2AudioWithFrames"
    assert fit.datamodule.prompt_format == "chat"
    lora_ar = str(REPO / "conf/experiment/lora_ar.yaml")
    tested = main(
        ["test", "--config", lora_ar, *layer_args(audio_dir), "--allow_untrained", "true"]
    )
    metrics = tested.trainer.callback_metrics
    assert "test/acc" in metrics and "test/attn_share/audio" in metrics
