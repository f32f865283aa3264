"""Frozen HF encoders built from tiny configs: shapes, freezing, preprocessing parity with the HF
feature extractors, padding, local-directory loading and the refusal of hub ids."""

import json

import numpy as np
import pytest
import torch
import transformers

from src.models.encoders import AudioEncoder, VisualEncoder, zero_mean_unit_var

SSL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_stride=(5, 4),
    conv_kernel=(10, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)
# Layer-norm feature extractor + attention mask: the HuBERT-large / wav2vec2-large setting.
SSL_LAYER = dict(SSL, feat_extract_norm="layer", do_stable_layer_norm=True)
WHISPER = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_layers=1,
    decoder_attention_heads=2,
    decoder_ffn_dim=64,
    num_mel_bins=16,
    max_source_positions=50,  # 100 mel frames = 1 s windows
)
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
VIDEOMAE = dict(VISION, num_frames=4, tubelet_size=2)


def audio(kind: str, **kwargs) -> AudioEncoder:
    torch.manual_seed(0)
    config = {"whisper": WHISPER, "hubert": SSL, "wav2vec2": SSL}[kind]
    return AudioEncoder(kind, config=kwargs.pop("config", config), **kwargs)


def visual(kind: str, **kwargs) -> VisualEncoder:
    torch.manual_seed(0)
    return VisualEncoder(kind, config=VIDEOMAE if kind == "videomae" else VISION, **kwargs)


@pytest.mark.parametrize("kind", ["hubert", "wav2vec2", "whisper"])
def test_audio_encoder_shape_and_frozen(kind):
    encoder = audio(kind)
    assert encoder.feature_dim == 32
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()  # Lightning does this each epoch; a frozen encoder must stay in eval
    assert not encoder.training and not encoder.model.training
    waves = torch.randn(3, 12_000)
    out = encoder(waves, torch.tensor([12_000, 8_000, 400]))
    assert out.shape == (3, 32) and torch.isfinite(out).all() and not out.requires_grad
    # Dropout off: two calls agree exactly.
    assert torch.equal(out, encoder(waves, torch.tensor([12_000, 8_000, 400])))


@pytest.mark.parametrize("kind", ["vit", "clip", "videomae"])
def test_visual_encoder_shape_frozen_and_uint8_path(kind):
    encoder = visual(kind)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training
    frames = torch.randint(0, 256, (2, 4, 3, 40, 56), dtype=torch.uint8)
    out = encoder(frames)
    assert out.shape == (2, encoder.feature_dim) and not out.requires_grad
    # Raw frames and frames already passed through encoder.frame_transform() agree.
    assert torch.allclose(out, encoder(encoder.frame_transform()(frames)), atol=1e-6)


def test_unfrozen_encoders_train():
    encoder = audio("hubert", freeze=False)
    encoder.train()
    assert encoder.training and all(p.requires_grad for p in encoder.parameters())
    encoder(torch.randn(2, 4000)).sum().backward()
    assert encoder.model.encoder.layers[0].attention.q_proj.weight.grad is not None
    vis = visual("vit", freeze=False)
    vis(torch.randint(0, 256, (1, 2, 3, 32, 32), dtype=torch.uint8)).sum().backward()
    assert vis.model.embeddings.patch_embeddings.projection.weight.grad is not None


def test_hub_id_and_bad_sources_are_refused():
    with pytest.raises(ValueError, match="not a local directory.*hf download") as info:
        AudioEncoder("hubert", pretrained="TencentGameMate/chinese-hubert-large")
    assert "TencentGameMate/chinese-hubert-large" in str(info.value)
    with pytest.raises(ValueError, match="not a local directory"):
        VisualEncoder("clip", pretrained="openai/clip-vit-large-patch14")
    with pytest.raises(ValueError, match="exactly one of"):
        AudioEncoder("hubert")
    with pytest.raises(ValueError, match="exactly one of"):
        VisualEncoder("vit", pretrained="/tmp", config=VISION)
    with pytest.raises(ValueError, match="kind must be one of"):
        AudioEncoder("wavlm", config=SSL)
    with pytest.raises(ValueError, match="kind must be one of"):
        VisualEncoder("resnet", config=VISION)


def test_local_directories_load_the_same_weights(tmp_path):
    hubert = audio("hubert")
    hubert.model.save_pretrained(tmp_path / "hubert")
    waves = torch.randn(2, 6000)
    assert torch.allclose(AudioEncoder("hubert", pretrained=str(tmp_path / "hubert"))(waves),
                          hubert(waves), atol=1e-6)  # fmt: skip
    # A whole Whisper checkpoint (encoder + decoder) is read; only the encoder is kept.
    torch.manual_seed(1)
    whole = transformers.WhisperModel(transformers.WhisperConfig(**WHISPER))
    whole.save_pretrained(tmp_path / "whisper")
    whisper = AudioEncoder("whisper", pretrained=str(tmp_path / "whisper"))
    assert isinstance(whisper.model, transformers.models.whisper.modeling_whisper.WhisperEncoder)
    assert torch.equal(whisper.model.conv1.weight, whole.encoder.conv1.weight)
    clip = visual("clip")
    clip.model.save_pretrained(tmp_path / "clip")
    # The checkpoint's preprocessor_config.json supplies the normalisation.
    stats = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.9, 0.8, 0.7]}
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(stats))
    loaded = VisualEncoder("clip", pretrained=str(tmp_path / "clip"))
    assert loaded.frame_transform().mean == (0.1, 0.2, 0.3)
    assert loaded.frame_transform().std == (0.9, 0.8, 0.7)
    frames = torch.randn(1, 2, 3, 32, 32)
    assert torch.allclose(loaded(frames), clip(frames), atol=1e-6)


def test_whisper_log_mel_matches_the_hf_feature_extractor():
    encoder = audio("whisper")
    reference = transformers.WhisperFeatureExtractor(
        feature_size=16, sampling_rate=16_000, hop_length=160, chunk_length=1, n_fft=400
    )
    wave = (0.1 * np.random.default_rng(0).standard_normal(11_000)).astype(np.float32)
    want = reference(wave, sampling_rate=16_000, return_tensors="pt").input_features
    padded = torch.nn.functional.pad(torch.from_numpy(wave)[None], (0, 16_000 - 11_000))
    got = encoder.mel(padded)
    assert got.shape == want.shape == (1, 16, 100)
    assert torch.allclose(got, want, atol=1e-4)


def test_waveform_normalisation_matches_the_hf_feature_extractor():
    reference = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=16_000,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,  # normalise over the valid samples only
    )
    rng = np.random.default_rng(0)
    waves = [(3 + 2 * rng.standard_normal(n)).astype(np.float32) for n in (900, 500)]
    want = reference(waves, sampling_rate=16_000, padding=True, return_tensors="pt").input_values
    batch = torch.zeros(2, 900)
    batch[0], batch[1, :500] = torch.from_numpy(waves[0]), torch.from_numpy(waves[1])
    got = zero_mean_unit_var(batch, torch.tensor([900, 500]))
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize(("kind", "config"), [("hubert", SSL_LAYER), ("wav2vec2", SSL_LAYER),
                                              ("whisper", WHISPER)])  # fmt: skip
def test_padding_does_not_change_a_clip_feature(kind, config):
    encoder = audio(kind, config=config)
    waves = torch.randn(2, 9_000)
    batched = encoder(waves, torch.tensor([9_000, 3_000]))
    alone = encoder(waves[1:, :3_000])
    assert torch.allclose(batched[1], alone[0], atol=1e-5)


def test_visual_input_checks():
    videomae = visual("videomae")
    with pytest.raises(ValueError, match="expects 4 frames per clip, got 3"):
        videomae(torch.randint(0, 256, (1, 3, 3, 32, 32), dtype=torch.uint8))
    vit = visual("vit")
    with pytest.raises(ValueError, match="expects 32x32 frames"):
        vit(torch.randn(1, 2, 3, 20, 20))
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 32)  # (B, 3, H, W): one frame per clip
    mean_pool = visual("vit", pool="mean")
    assert not torch.allclose(mean_pool(torch.randn(1, 3, 32, 32)), vit(torch.randn(1, 3, 32, 32)))
