"""Qwen2.5-Omni's thinker as a backbone: a tiny random thinker saved with ``save_pretrained``
beside a byte-level BPE tokenizer with a ChatML chat template (both made here, nothing
downloaded); its audio/video positions hold exactly the thinker's own tower outputs, and the
real CLI fits it with LoRA and MoSE (its LM only) and tests it with AR (its LM only)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    WhisperFeatureExtractor,
)
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from src.cli import main
from src.core.errors import InvalidInputError
from src.core.label_space import MER2023
from src.core.modality import Modality
from src.core.streams import StreamSpec
from src.data.camer.datamodule import SyntheticCAMERDataModule
from src.data.camer.synthetic import SyntheticCAMERConfig
from src.data.components.prompt import PromptBuilder
from src.data.components.tokenizer import load_tokenizer
from src.models.backbones.qwen_omni import (
    OmniThinkerLM,
    QwenOmniThinker,
    pack_audio,
    pack_video,
    unpack_audio,
    unpack_video,
)
from src.models.mose import mose_layers
from src.models.multimodal_llm import MultimodalEmotionLLM
from src.models.qwen_omni_inputs import QwenOmniAudioInput, QwenOmniVideoInput
from tests.conftest import REPO, TINY_CONFIG
from tests.families import corpus
from tests.fault_injection import expect_user_error
from tests.mini_mer import write_mer2023

MELS, AUDIO_TOKENS = 16, 4  # 16 mel bins, 16 mel frames -> 4 audio tokens
PATCH, TEMPORAL, MERGE = 4, 2, 2
GRID = [1, 4, 4]  # 2 frames of 16 x 16 pixels -> 4 video tokens
VIDEO_TOKENS = GRID[0] * GRID[1] * GRID[2] // MERGE**2
AUDIO_DIM = 4 * MELS
VIDEO_DIM = MERGE**2 * 3 * TEMPORAL * PATCH**2
MOSE = str(REPO / "tests/conf/mose.yaml")
AR = ["--trainer.callbacks+=src.callbacks.attention_reallocation.AttentionReallocation"]
SHORT = ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.limit_test_batches", "1", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|audio_eos|>",
            "<|vision_bos|>", "<|vision_eos|>", "<|AUDIO|>", "<|VIDEO|>"]  # fmt: skip
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Qwen2.5-Omni's prompts as the 7B layer writes them (its ChatML with its system prompt, audio
#: inside <|audio_bos|>..., video inside <|vision_bos|>...).
OMNI_LAYER = REPO / "conf/experiment/qwen2_5_omni.yaml"
TEMPLATES = yaml.safe_load(OMNI_LAYER.read_text())["data"]["init_args"]["templates"]
#: The tokens of its audio and video positions (as the layer sets them): the thinker finds them
#: by these ids.
PLACEHOLDERS = yaml.safe_load(OMNI_LAYER.read_text())["data"]["init_args"]["placeholder_tokens"]
STREAMS = [
    {"name": "video", "feature_dir": "qwen_omni_video", "modality": "visual",
     "dim": VIDEO_DIM, "tokens": VIDEO_TOKENS, "sequence": True},
    {"name": "audio", "feature_dir": "qwen_omni_audio", "modality": "audio",
     "dim": AUDIO_DIM, "tokens": AUDIO_TOKENS, "sequence": True},
]  # fmt: skip


def thinker_config(
    tokenizer: PreTrainedTokenizerFast, init_range: float = 0.02
) -> Qwen2_5OmniThinkerConfig:
    """A tiny thinker: 1-layer audio tower, 1-block vision tower, 2-layer text model; its
    audio/video token ids are the tokenizer's ``<|AUDIO|>`` and ``<|VIDEO|>``; ``init_range``:
    its text model's initializer range (large: sharp attention, so positions matter)."""
    vocab_size = len(tokenizer)
    return Qwen2_5OmniThinkerConfig(
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<|VIDEO|>"),
        # Its TMRoPE finds each block by its start marker, as the released config.json names.
        audio_start_token_id=tokenizer.convert_tokens_to_ids("<|audio_bos|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_bos|>"),
        audio_config={"num_mel_bins": MELS, "encoder_layers": 1, "encoder_attention_heads": 2,
                      "encoder_ffn_dim": 32, "d_model": 16, "output_dim": 32, "n_window": 8,
                      "max_source_positions": 64},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": 32, "patch_size": PATCH, "spatial_merge_size": MERGE,
                       "temporal_patch_size": TEMPORAL, "window_size": 8,
                       "fullatt_block_indexes": [0]},
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "initializer_range": init_range,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [1, 1, 2]}},
    )  # fmt: skip


def chatml_tokenizer(save_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's ChatML specials and chat template (no BOS, as Qwen)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML,
    )  # fmt: skip
    fast.save_pretrained(str(save_dir))
    return fast


def write_omni_dir(save_dir: Path, init_range: float = 0.02) -> Path:
    """Write a local Qwen2.5-Omni-thinker-like directory: tiny random thinker, its tokenizer
    and its processor's parts."""
    tokenizer = chatml_tokenizer(save_dir)
    torch.manual_seed(0)
    thinker = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(tokenizer, init_range))
    thinker.save_pretrained(str(save_dir))
    # Its processor's parts: 16 mel bins; 4-pixel patches, frames resized to 16 x 16.
    WhisperFeatureExtractor(feature_size=MELS).save_pretrained(str(save_dir))
    side = (GRID[1] * PATCH) ** 2
    Qwen2VLVideoProcessor(
        patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE,
        size={"shortest_edge": side, "longest_edge": side},
    ).save_pretrained(str(save_dir))  # fmt: skip
    return save_dir


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory) -> Path:
    """A local Qwen2.5-Omni-thinker-like directory (:func:`write_omni_dir`)."""
    return write_omni_dir(tmp_path_factory.mktemp("qwen_omni"))


def config_file(folder: Path, omni_dir: Path) -> str:
    """The tiny test config with the Qwen2.5-Omni thinker and its two processor streams."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    config["model"]["init_args"]["backbone"] = {
        "class_path": "src.models.backbones.qwen_omni.QwenOmniThinker",
        "init_args": {"path": str(omni_dir), "video_grid": GRID},
    }
    data = config["data"]["init_args"]
    data.update(root="data/camer_qwen_omni", tokenizer=str(omni_dir), streams=STREAMS,
                templates=TEMPLATES, prompt_format="chat", batch_size=8,
                placeholder_tokens=PLACEHOLDERS)  # fmt: skip
    path = folder / "qwen_omni.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def adapted(model: torch.nn.Module, marker: str) -> set[str]:
    return {n.split(f".{marker}")[0] for n, _ in model.named_parameters() if f".{marker}" in n}


def test_the_packing_round_trips():
    mels = torch.randn(2, MELS, 4 * AUDIO_TOKENS)
    rows = pack_audio(mels)
    assert rows.shape == (2, AUDIO_TOKENS, AUDIO_DIM)
    assert torch.equal(unpack_audio(rows, MELS), mels)
    pixels = torch.randn(2 * VIDEO_TOKENS * MERGE**2, VIDEO_DIM // MERGE**2)
    assert pack_video(pixels, 2, MERGE).shape == (2, VIDEO_TOKENS, VIDEO_DIM)


def test_the_stream_positions_hold_the_thinkers_own_tower_outputs(omni_dir):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(omni_dir))
    streams = [StreamSpec(**s) for s in STREAMS]
    backbone = QwenOmniThinker(path=str(omni_dir), video_grid=GRID)
    backbone.build(tokenizer, streams)
    assert isinstance(backbone.language_model, OmniThinkerLM)
    assert len(backbone.layers()) == 2  # the text model's decoder layers, not the towers'
    assert backbone.attention_model() is backbone.language_model
    lm_modules = {id(m) for m in backbone.language_model.modules()}
    assert not any(id(m) in lm_modules for m in backbone.audio_tower.modules())
    assert not any(p.requires_grad for p in backbone.parameters())
    assert QwenOmniThinker(**backbone.settings()).settings() == backbone.settings()
    # What AR switches is the LM's attention only, never the audio tower's (same interface).
    tower_attention = backbone.audio_tower.config._attn_implementation
    backbone.attention_model().set_attn_implementation("eager")
    assert backbone.language_model.model.config._attn_implementation == "eager"
    assert backbone.audio_tower.config._attn_implementation == tower_attention
    backbone.attention_model().set_attn_implementation(tower_attention)

    reference = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(omni_dir)).eval()
    torch.manual_seed(1)
    mels = torch.randn(2, MELS, 4 * AUDIO_TOKENS)
    pixels = torch.randn(2 * VIDEO_TOKENS * MERGE**2, VIDEO_DIM // MERGE**2)
    features = {"audio": pack_audio(mels), "video": pack_video(pixels, 2, MERGE)}
    # Two prompts: text, 4 video positions, text, 4 audio positions, text.
    row = [-1, *[0] * VIDEO_TOKENS, -1, *[1] * AUDIO_TOKENS, -1]
    stream_ids = torch.tensor([row, row])
    input_ids = torch.full_like(stream_ids, tokenizer.pad_token_id)
    with pytest.raises(InvalidInputError, match="data.placeholder_tokens"):
        backbone.embed(input_ids, stream_ids, features)  # pad ids: not its audio/video ids
    input_ids[stream_ids == 0] = backbone.video_token_id
    input_ids[stream_ids == 1] = backbone.audio_token_id
    with torch.no_grad():
        embeds = backbone.embed(input_ids, stream_ids, features)
        audio = reference.get_audio_features(
            mels, feature_attention_mask=torch.ones(2, 4 * AUDIO_TOKENS, dtype=torch.long)
        ).last_hidden_state
        grid = torch.tensor([GRID, GRID])
        video = torch.cat(reference.get_video_features(pixels, grid).pooler_output)
        logits = backbone.language_model(inputs_embeds=embeds).logits
        ref_logits = reference(inputs_embeds=embeds).logits
    assert torch.allclose(embeds[stream_ids == 1], audio, atol=1e-6)
    assert torch.allclose(embeds[stream_ids == 0], video, atol=1e-6)
    text = reference.get_input_embeddings()(input_ids[:, :1])
    assert torch.equal(embeds[:, :1], text)
    # The LM is the thinker's own text model + head: same logits on the same embeddings.
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    # It generates (greedy, with its cache) after the filled embeddings, as the thinker does.
    mask = torch.ones_like(input_ids)
    settings = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    ours = backbone.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
    theirs = reference.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
    assert ours.shape == (2, 3) and torch.equal(ours, theirs[:, -3:])


def omni_datamodule(omni_dir: Path, **options) -> SyntheticCAMERDataModule:
    """The tiny synthetic CA-MER with the thinker's two processor streams, prompts and tokens."""
    options = {"placeholder_tokens": PLACEHOLDERS, **options}
    return SyntheticCAMERDataModule(
        root="data/camer_qwen_omni_small",
        synthetic=SyntheticCAMERConfig(n_train=4, n_val=4, n_test=6),
        tokenizer=str(omni_dir), streams=[StreamSpec(**s) for s in STREAMS],
        templates=TEMPLATES, prompt_format="chat", eval_batch_size=6, **options,
    )  # fmt: skip


def test_its_audio_video_positions_hold_its_token_ids_and_modality_ids_follow(omni_dir, workdir):
    data = omni_datamodule(omni_dir)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    backbone = QwenOmniThinker(path=str(omni_dir), video_grid=GRID)
    backbone.build(load_tokenizer(str(omni_dir)), data.streams)
    tokenizer = data.collator.prompt_builder.tokenizer
    audio_id = tokenizer.convert_tokens_to_ids(PLACEHOLDERS["audio"])
    video_id = tokenizer.convert_tokens_to_ids(PLACEHOLDERS["video"])
    assert (backbone.audio_token_id, backbone.video_token_id) == (audio_id, video_id)
    ids, streams = batch["input_ids"], batch["stream_ids"]
    assert (ids[streams == 1] == audio_id).all() and (ids[streams == 0] == video_id).all()
    assert int((ids == audio_id).sum()) == AUDIO_TOKENS * len(ids)
    assert int((ids == video_id).sum()) == VIDEO_TOKENS * len(ids)
    # The batch's modality_ids (what AR and MoSE read) are what the thinker's token ids say.
    real = batch["modality_ids"] != int(Modality.PAD)
    assert torch.equal(batch["modality_ids"][real], backbone.modality_ids(ids)[real])
    assert set(batch["modality_ids"][real].tolist()) == {0, 1, 2}
    with torch.no_grad():
        assert backbone.embed(ids, streams, batch["features"]).shape[:2] == ids.shape


@pytest.fixture(scope="module")
def sharp_omni_dir(tmp_path_factory) -> Path:
    """A thinker whose text model attends sharply (initializer range 0.5): at init the default
    range gives near-uniform attention, under which positions hardly change a score."""
    return write_omni_dir(tmp_path_factory.mktemp("qwen_omni_sharp"), init_range=0.5)


def test_it_scores_and_generates_at_the_thinkers_own_tmrope_positions(sharp_omni_dir, workdir):
    """Closed-set scores (prompt once + answer tree) and greedy generation equal the thinker's
    own forward and generate on its own inputs (token ids, log-mels, pixels, grid, seconds per
    grid), which compute TMRoPE positions themselves."""
    data = omni_datamodule(sharp_omni_dir)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    tokenizer = data.collator.prompt_builder.tokenizer
    backbone = QwenOmniThinker(path=str(sharp_omni_dir), video_grid=GRID, seconds_per_grid=2.0)
    llm = MultimodalEmotionLLM(backbone, tokenizer, data.streams, MER2023.labels).eval()
    reference = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        str(sharp_omni_dir)
    ).eval()

    ids, streams = batch["input_ids"], batch["stream_ids"]
    positions = llm.positions(ids, batch["modality_ids"])
    assert positions.shape == (3, *ids.shape)
    video = positions[:, streams == 0]  # (3, video tokens): rows and columns differ from time
    assert not torch.equal(video[1], video[2]) and not torch.equal(video[0], video[1])
    audio = positions[:, streams == 1]
    assert torch.equal(audio[0], audio[1]) and torch.equal(audio[1], audio[2])  # sequential

    mels = unpack_audio(batch["features"]["audio"], MELS)
    pixels = unpack_video(batch["features"]["video"], MERGE).view(len(ids), -1, VIDEO_DIM // 4)
    with torch.no_grad():
        scores = llm.score_labels(batch)
        # The repeated rows (prompt + answer, as the LM loss runs) sit at the same positions.
        assert torch.allclose(llm.score_labels_repeated(batch), scores, atol=1e-4)
        texts = llm.generate(batch, max_new_tokens=3)
    lengths = (batch["modality_ids"] != int(Modality.PAD)).sum(dim=1)
    for row in range(len(ids)):
        inputs = {
            "input_features": mels[row : row + 1],
            "feature_attention_mask": torch.ones(1, mels.shape[-1], dtype=torch.long),
            "pixel_values_videos": pixels[row],
            "video_grid_thw": torch.tensor([GRID]),
            "video_second_per_grid": torch.tensor([2.0]),
        }
        prompt = ids[row, : lengths[row]]
        expected = []
        for answer in llm.label_answer_ids:
            seq = torch.cat([prompt, torch.tensor(answer)])[None]
            with torch.no_grad():
                logits = reference(input_ids=seq, attention_mask=torch.ones_like(seq), **inputs)
            logprobs = torch.log_softmax(logits.logits[0, len(prompt) - 1 : -1].float(), dim=-1)
            token_lp = logprobs.gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)
            expected.append(token_lp.mean() if llm.length_normalize else token_lp.sum())
        assert torch.allclose(scores[row], torch.stack(expected), atol=1e-4), row
        with torch.no_grad():
            out = reference.generate(
                input_ids=prompt[None], attention_mask=torch.ones_like(prompt[None]), **inputs,
                max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        assert texts[row] == tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)


def test_a_block_without_its_start_marker_is_one_line(omni_dir):
    tokenizer = load_tokenizer(str(omni_dir))
    backbone = QwenOmniThinker(path=str(omni_dir), video_grid=GRID)
    backbone.build(tokenizer, [StreamSpec(**s) for s in STREAMS])
    ids = torch.tensor([[tokenizer.eos_token_id, *[backbone.audio_token_id] * AUDIO_TOKENS]])
    with pytest.raises(InvalidInputError, match=r"<\|audio_bos\|> before the placeholder"):
        backbone.position_ids(ids, torch.ones_like(ids, dtype=torch.bool))


def test_other_configs_keep_the_pad_id_and_an_unknown_token_is_one_line(omni_dir, workdir, capsys):
    tokenizer = load_tokenizer(str(omni_dir))
    streams = [StreamSpec(**s) for s in STREAMS]
    plain = PromptBuilder(tokenizer, streams, list(MER2023.labels), TEMPLATES, "chat")
    prompt = plain.encode("i went home .")
    held = {i for i, s in zip(prompt.input_ids, prompt.stream_ids, strict=True) if s >= 0}
    assert held == {tokenizer.pad_token_id}  # the default: unchanged
    with pytest.raises(InvalidInputError, match=r"^data.placeholder_tokens: '<\|NOPE\|>'"):
        omni_datamodule(omni_dir, placeholder_tokens={"audio": "<|NOPE|>"}).setup("test")
    with pytest.raises(InvalidInputError, match=r"^data.placeholder_tokens: \['face'\]"):
        PromptBuilder(tokenizer, streams, list(MER2023.labels), TEMPLATES, "chat",
                      placeholder_tokens={"face": "<|AUDIO|>"})  # fmt: skip
    line = expect_user_error(capsys, ["test", "--config", config_file(workdir, omni_dir),
                                      "--data.init_args.placeholder_tokens", "{audio: <|NOPE|>}",
                                      "--allow_untrained", "true"])  # fmt: skip
    assert "data.placeholder_tokens: '<|NOPE|>' (stream 'audio')" in line


@pytest.mark.slow
def test_lora_and_mose_fit_its_lm_and_ar_tests_its_lm(omni_dir, workdir):
    config = config_file(workdir, omni_dir)
    lora = main(["fit", "--config", config, *SHORT, "--test_after_fit", "false"])
    assert lora.trainer.state.finished and lora.trainer.global_step == 2
    backbone = lora.model.model.backbone
    assert type(backbone).__name__ == "QwenOmniThinker"
    names = adapted(backbone, "lora_A")
    assert names and all(".layers." in n and "self_attn" in n for n in names)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    assert not any("lora_" in n for n, _ in backbone.audio_tower.named_parameters())
    best = lora.trainer.checkpoint_callback.best_model_path
    saved = torch.load(best, weights_only=True)["state_dict"]
    assert any("lora_A" in k for k in saved)  # the trained LoRA only: no frozen tower or LM
    assert not any("audio_tower" in k or "visual" in k or "embed_tokens" in k for k in saved)

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


def media_config_file(folder: Path, omni_dir: Path) -> str:
    """:func:`config_file` on the tiny MER2023 clips (``source: media``): 2 frames of 32 x 32
    and the audio go through the model's own processor (the online encoders)."""
    path = Path(config_file(folder, omni_dir))
    config = yaml.safe_load(path.read_text())
    mer = yaml.safe_load((REPO / "tests/conf/mer2023_tiny.yaml").read_text())
    mer["init_args"].update(
        tokenizer=str(omni_dir), streams=STREAMS, templates=TEMPLATES, prompt_format="chat",
        placeholder_tokens=PLACEHOLDERS, source="media",
        media={"video_dir": "video", "strategy": "uniform", "num_frames": 2, "frame_size": 32},
    )  # fmt: skip
    config["data"] = mer
    config["model"]["init_args"]["encoders"] = {
        "video": {"class_path": "src.models.qwen_omni_inputs.QwenOmniVideoInput",
                  "init_args": {"processor": str(omni_dir)}},
        "audio": {"class_path": "src.models.qwen_omni_inputs.QwenOmniAudioInput",
                  "init_args": {"processor": str(omni_dir), "tokens": AUDIO_TOKENS}},
    }  # fmt: skip
    config["trainer"]["callbacks"][0]["init_args"]["monitor"] = "val/acc"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_the_processor_inputs_are_the_processors_own_tensors(omni_dir):
    audio = QwenOmniAudioInput(str(omni_dir), tokens=AUDIO_TOKENS)
    waves = torch.randn(2, 3000)
    rows = audio(waves, torch.tensor([3000, 1000]))
    extractor = WhisperFeatureExtractor.from_pretrained(str(omni_dir))
    mels = extractor(
        [waves[1, :1000].numpy()],
        sampling_rate=16000,
        padding="max_length",
        max_length=4 * AUDIO_TOKENS * 160,
        return_tensors="pt",
    ).input_features
    assert rows.shape == (2, AUDIO_TOKENS, AUDIO_DIM)
    assert torch.allclose(unpack_audio(rows, MELS)[1:], mels)
    video = QwenOmniVideoInput(str(omni_dir))
    frames = torch.randint(0, 256, (2, 2, 3, 32, 32), dtype=torch.uint8)
    assert video.grid(frames) == GRID
    assert video(frames).shape == (2, VIDEO_TOKENS, VIDEO_DIM)
    with pytest.raises(ValueError, match="not a local directory"):
        QwenOmniVideoInput("no/such/dir")


@pytest.mark.slow
def test_raw_clips_go_through_its_processor_and_towers(omni_dir, workdir):
    write_mer2023(workdir / "mer2023_tiny", n_train=8, n_test=3)
    config = media_config_file(workdir, omni_dir)
    fit = main(["fit", "--config", config, *SHORT, "--trainer.limit_val_batches", "1"])
    assert fit.trainer.state.finished and fit.trainer.global_step == 2
    assert "test/acc" in fit.trainer.callback_metrics
    best = fit.trainer.checkpoint_callback.best_model_path
    tested = main(["test", "--config", config, *AR, "--ckpt_path", best])
    metrics = tested.trainer.callback_metrics
    before = float(metrics["test/attn_share_before/audio"])
    assert 0.0 < float(metrics["test/attn_share/audio"]) < before


def layer_args(omni_dir: Path) -> list[str]:
    """conf/experiment/qwen2_5_omni.yaml with only the directory and the sizes made tiny."""
    streams = yaml.safe_dump(STREAMS, default_flow_style=True).strip()
    return [
        "--config", str(OMNI_LAYER),
        "--model.backbone.path", str(omni_dir), "--model.backbone.dtype", "float32",
        "--model.backbone.video_grid", str(GRID),
        "--model.init_args.encoders.video.init_args.processor", str(omni_dir),
        "--model.init_args.encoders.audio.init_args.processor", str(omni_dir),
        "--model.init_args.encoders.audio.init_args.tokens", str(AUDIO_TOKENS),
        "--data.init_args.tokenizer", str(omni_dir), "--data.init_args.source", "features",
        "--data.init_args.streams", streams, "--trainer.limit_val_batches", "1",
        "--trainer.limit_test_batches", "1", "--trainer.num_sanity_val_steps", "0",
    ]  # fmt: skip


@pytest.mark.slow
def test_the_7b_layer_runs_with_the_tiny_thinker_in_its_place(omni_dir, workdir):
    """conf/experiment/qwen2_5_omni.yaml (+ conf/model/qwen2_5_omni_7b.yaml) over the
    experiments, as the README runs them: fit, and zero-shot test with calibrated AR."""
    lora = str(REPO / "conf/experiment/lora.yaml")
    fit = main(["fit", "--config", lora, *layer_args(omni_dir), "--trainer.max_steps", "1",
                "--test_after_fit", "false"])  # fmt: skip
    assert fit.trainer.state.finished and fit.trainer.global_step == 1
    assert type(fit.model.model.backbone).__name__ == "QwenOmniThinker"
    assert fit.datamodule.prompt_format == "chat"
    lora_ar = str(REPO / "conf/experiment/lora_ar.yaml")
    tested = main(["test", "--config", lora_ar, *layer_args(omni_dir), "--allow_untrained", "true"])
    metrics = tested.trainer.callback_metrics
    assert "test/acc" in metrics and "test/attn_share/audio" in metrics


@pytest.mark.slow
def test_extract_stores_the_processor_features_the_backbone_reads(omni_dir, workdir):
    """`extract` with the processor encoders writes the store; fit reads it (no decoding)."""
    names = write_mer2023(workdir / "mer2023_tiny", n_train=8, n_test=3)
    config = yaml.safe_load(Path(media_config_file(workdir, omni_dir)).read_text())
    extract = workdir / "extract.yaml"
    encoders = config["model"]["init_args"]["encoders"]
    extract.write_text(yaml.safe_dump({"data": config["data"], "encoders": encoders}))
    assert main(["extract", "--config", str(extract)]) == 0
    first = names["train"][0]
    video = np.load(workdir / "mer2023_tiny" / "qwen_omni_video" / f"{first}.npy")
    audio = np.load(workdir / "mer2023_tiny" / "qwen_omni_audio" / f"{first}.npy")
    assert video.shape == (VIDEO_TOKENS, VIDEO_DIM) and audio.shape == (AUDIO_TOKENS, AUDIO_DIM)
    fit = main(["fit", "--config", media_config_file(workdir, omni_dir), *SHORT,
                "--data.init_args.source", "features", "--test_after_fit", "false"])  # fmt: skip
    assert fit.trainer.state.finished and fit.trainer.global_step == 2
