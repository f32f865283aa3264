"""EVA-CLIP-g online: a tiny EVA ViT checkpoint in exactly the released ``eva_vit_g.pth`` layout
(one block more than the model builds, trained at a 2 x 2 grid, run at 4 x 4) loads into
:class:`EVACLIPGEncoder`, whose tokens equal a forward written out here from the raw tensors;
bad files are refused in one line; ``extract`` writes Emotion-LLaMA's two EVA folders from raw
clips; and the converted tiny Emotion-LLaMA tests on raw clips with the encoder online."""

import math
import pickle
from dataclasses import asdict

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from src.cli import main
from src.core.errors import UserError
from src.core.streams import StreamSpec
from src.data.components.media_source import MediaLoader, MediaSpec
from src.models.eva_clip_encoder import CLIP_MEAN, CLIP_STD, EVACLIPGEncoder
from tests.conftest import REPO
from tests.fault_injection import expect_user_error
from tests.mini_mer import write_features, write_mer2023
from tests.models.test_emotion_llama import EVA, FEAT, PATCHES, convert, released  # noqa: F401

HEADS, DEPTH, PATCH, RATIO = 2, 2, 14, 4.3637  # hidden int(8 * 4.3637) = 34
TRAINED, SIZE = 28, 56  # checkpoint grid 2 x 2, model grid 4 x 4 -> PATCHES = 16
TINY = {"width": EVA, "depth": DEPTH, "heads": HEADS, "mlp_ratio": RATIO, "patch": PATCH}
HIDDEN = int(EVA * RATIO)
EVA_STREAMS = [
    StreamSpec("image", "eva_clip_g_patches", "visual", 4 * EVA, PATCHES // 4, sequence=True),
    StreamSpec("cls", "eva_clip_g_cls", "visual", EVA, 1),
]
STORED = [StreamSpec(n, d, m, FEAT, 1) for n, d, m in [
    ("face", "mae_340_UTT", "visual"), ("video", "maeV_399_UTT", "visual"),
    ("audio", "HL-UTT", "audio")]]  # fmt: skip


def eva_state(seed: int = 0, blocks: int = DEPTH + 1) -> dict[str, torch.Tensor]:
    """Tensors named and shaped as MiniGPT-4's eva_vit_g.pth (flat; 40 blocks there), tiny."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    grid = TRAINED // PATCH
    state = {
        "cls_token": rand(1, 1, EVA),
        "pos_embed": rand(1, 1 + grid * grid, EVA),
        "patch_embed.proj.weight": rand(EVA, 3, PATCH, PATCH, scale=0.05),
        "patch_embed.proj.bias": rand(EVA),
    }
    for i in range(blocks):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": rand(EVA, scale=0.1, base=1.0), b + "norm1.bias": rand(EVA),
            b + "attn.qkv.weight": rand(3 * EVA, EVA), b + "attn.q_bias": rand(EVA),
            b + "attn.v_bias": rand(EVA), b + "attn.proj.weight": rand(EVA, EVA),
            b + "attn.proj.bias": rand(EVA),
            b + "norm2.weight": rand(EVA, scale=0.1, base=1.0), b + "norm2.bias": rand(EVA),
            b + "mlp.fc1.weight": rand(HIDDEN, EVA), b + "mlp.fc1.bias": rand(HIDDEN),
            b + "mlp.fc2.weight": rand(EVA, HIDDEN), b + "mlp.fc2.bias": rand(EVA),
        })  # fmt: skip
    return state


@pytest.fixture
def eva_file(tmp_path):
    path = tmp_path / "eva_vit_g.pth"
    torch.save(eva_state(), path)
    return path


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def reference_tokens(state, images, ln_weight, ln_bias):
    """EVA ViT + ln_vision from the raw tensors: the patch conv as unfold + matmul, the position
    embedding's patch grid resized bicubically (CLS entry kept), attention written out."""
    batch = images.shape[0]
    cols = F.unfold(images, kernel_size=PATCH, stride=PATCH).transpose(1, 2)  # (B, 16, 588)
    x = cols @ state["patch_embed.proj.weight"].reshape(EVA, -1).T + state["patch_embed.proj.bias"]
    old, new = TRAINED // PATCH, SIZE // PATCH
    grid = state["pos_embed"][0, 1:].T.reshape(1, EVA, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    pos = torch.cat([state["pos_embed"][0, :1], grid.reshape(EVA, new * new).T])
    x = torch.cat([state["cls_token"].expand(batch, 1, EVA), x], dim=1) + pos
    head = EVA // HEADS
    for i in range(DEPTH):  # block DEPTH (the file's last) is not used
        prefix = f"blocks.{i}."
        block = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        h = layer_norm(x, block["norm1.weight"], block["norm1.bias"], 1e-6)
        bias = torch.cat([block["attn.q_bias"], torch.zeros(EVA), block["attn.v_bias"]])
        q, k, v = (h @ block["attn.qkv.weight"].T + bias).split(EVA, dim=-1)
        q, k, v = (t.reshape(batch, -1, HEADS, head).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head), dim=-1)
        attn = (weights @ v).transpose(1, 2).reshape(batch, -1, EVA)
        x = x + attn @ block["attn.proj.weight"].T + block["attn.proj.bias"]
        h = layer_norm(x, block["norm2.weight"], block["norm2.bias"], 1e-6)
        h = h @ block["mlp.fc1.weight"].T + block["mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ block["mlp.fc2.weight"].T + block["mlp.fc2.bias"]
    return layer_norm(x, ln_weight, ln_bias, 1e-5)  # MiniGPT's ln_vision: torch's default eps


def test_the_encoder_equals_the_written_out_forward_and_fills_both_streams(eva_file, tmp_path):
    g = torch.Generator().manual_seed(3)
    frames = torch.randint(0, 256, (2, 3, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    images = (frames[:, 0].float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(
        CLIP_STD
    )[:, None, None]  # the first frame of each clip, already at the model's size
    state = eva_state()
    # Emotion-LLaMA's released file holds ln_vision only when it was trained; here it does.
    ln = {"ln_vision.weight": 1 + 0.1 * torch.randn(EVA, generator=g),
          "ln_vision.bias": 0.1 * torch.randn(EVA, generator=g)}  # fmt: skip
    torch.save({"model": ln}, tmp_path / "emotion_llama.pth")
    encoder = EVACLIPGEncoder(
        weights=str(eva_file), config=TINY, image_size=SIZE,
        ln_vision=str(tmp_path / "emotion_llama.pth"),
    )  # fmt: skip
    assert encoder.ignored_keys == [k for k in state if k.startswith(f"blocks.{DEPTH}.")]
    assert encoder.output_streams == ("image", "cls")
    out = encoder(frames)
    ref = reference_tokens(state, images, ln["ln_vision.weight"], ln["ln_vision.bias"])
    assert out["image"].shape == (2, PATCHES // 4, 4 * EVA) and out["cls"].shape == (2, EVA)
    assert (out["cls"] - ref[:, 0]).abs().max() < 1e-5
    # Four consecutive patch tokens concatenated per row, as Emotion-LLaMA's view().
    assert (out["image"] - ref[:, 1:].reshape(2, PATCHES // 4, 4 * EVA)).abs().max() < 1e-5
    assert not torch.allclose(out["cls"][0], out["cls"][1])  # the frames matter
    # Without ln_vision weights: MiniGPT-v2's fresh LayerNorm (weight 1, bias 0).
    plain = EVACLIPGEncoder(weights=str(eva_file), config=TINY, image_size=SIZE)(frames)
    ref = reference_tokens(state, images, torch.ones(EVA), torch.zeros(EVA))
    assert (plain["cls"] - ref[:, 0]).abs().max() < 1e-5
    # Frozen: no gradients, and train() keeps eval mode.
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training


class Hostile:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_weight_files_are_refused_in_one_line(tmp_path):
    def refused(path, **kwargs) -> str:
        with pytest.raises(UserError) as err:
            EVACLIPGEncoder(weights=str(path), config=TINY, image_size=SIZE, **kwargs)
        message = str(err.value)
        assert "\n" not in message and "pwned" not in message
        return message

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"cls_token": Hostile()}))
    assert str(evil) in refused(evil)
    state = eva_state()
    unknown = tmp_path / "unknown.pth"
    key = "blocks.0.attn.relative_position_bias_table"
    torch.save({**state, key: torch.zeros(3, HEADS)}, unknown)
    line = refused(unknown)
    assert str(unknown) in line and key in line and "unknown key" in line
    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "blocks.1.attn.v_bias"}, missing)
    line = refused(missing)
    assert str(missing) in line and "blocks.1.attn.v_bias" in line and "missing" in line
    wide = tmp_path / "wide.pth"
    torch.save({**state, "blocks.0.attn.q_bias": torch.zeros(EVA + 1)}, wide)
    assert "blocks.0.attn.q_bias" in refused(wide)
    line = refused("BAAI/EVA-CLIP")  # a hub id is never downloaded
    assert "eva_vit_g.pth" in line and "storage.googleapis.com" in line
    no_ln = tmp_path / "no_ln.pth"
    torch.save({"model": {"llama_proj.weight": torch.ones(1)}}, no_ln)
    torch.save(state, tmp_path / "eva.pth")
    with pytest.raises(UserError, match="missing key 'ln_vision.weight'"):
        EVACLIPGEncoder(weights=str(tmp_path / "eva.pth"), config=TINY, image_size=SIZE,
                        ln_vision=str(no_ln))  # fmt: skip


def write_patterned_clips(folder, names) -> None:
    """Clips whose first frames differ (a seeded colour pattern each), 40 x 30, 3 frames, no
    audio (the audio stream stays stored)."""
    for i, name in enumerate(names):
        rng = np.random.default_rng(i)
        with av.open(str(folder / f"{name}.mp4"), "w") as container:
            video = container.add_stream("mpeg4", rate=10)
            video.width, video.height, video.pix_fmt = 40, 30, "yuv420p"
            for _ in range(3):
                pixels = np.kron(rng.integers(0, 256, (3, 4, 3)), np.ones((10, 10, 1)))
                frame = av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")
                container.mux(video.encode(frame))
            container.mux(video.encode(None))


def mer_data(workdir, streams) -> dict:
    """The tiny MER2023 folder (patterned clips, stored face/video/audio) as a data config."""
    root = workdir / "mer2023_tiny"
    names = write_mer2023(root, n_train=8, n_test=3)
    everyone = names["train"] + names["test"]
    write_patterned_clips(root / "video", everyone)
    write_features(root, everyone, STORED)
    data = yaml.safe_load((REPO / "tests/conf/mer2023_tiny.yaml").read_text())
    data["init_args"].update(
        root=str(root), streams=[asdict(s) for s in streams],
        media={"video_dir": "video", "strategy": "first", "frame_size": SIZE, "crop": False,
               "interpolation": "bicubic"},
    )  # fmt: skip
    return data


def encoder_config(eva_file) -> dict:
    return {
        "class_path": "src.models.eva_clip_encoder.EVACLIPGEncoder",
        "init_args": {"weights": str(eva_file), "config": TINY, "image_size": SIZE},
    }


def test_extract_writes_both_eva_folders_equal_to_the_online_encoder(eva_file, workdir):
    data = mer_data(workdir, EVA_STREAMS)
    config = workdir / "extract.yaml"
    config.write_text(yaml.safe_dump({"data": data, "encoders": {"cls": encoder_config(eva_file)},
                                      "progress": False}))  # fmt: skip
    assert main(["extract", "--config", str(config)]) == 0
    root = workdir / "mer2023_tiny"
    encoder = EVACLIPGEncoder(weights=str(eva_file), config=TINY, image_size=SIZE)
    spec = MediaSpec(**data["init_args"]["media"])
    loader = MediaLoader(root, spec, video=True, audio=False)
    seen = []
    for name in ("train_00", "train_05", "test_02"):
        patches = np.load(root / "eva_clip_g_patches" / f"{name}.npy")
        cls = np.load(root / "eva_clip_g_cls" / f"{name}.npy")
        assert patches.shape == (PATCHES // 4, 4 * EVA) and cls.shape == (EVA,)
        frames = loader.load(name)["frames"]
        assert tuple(frames.shape) == (1, 3, SIZE, SIZE)  # the first frame only
        with torch.no_grad():
            online = encoder(frames[None])
        assert np.abs(online["image"][0].numpy() - patches).max() < 1e-6
        assert np.abs(online["cls"][0].numpy() - cls).max() < 1e-6
        seen.append(cls)
    assert not np.allclose(seen[0], seen[1])
    for folder in ("eva_clip_g_patches", "eva_clip_g_cls"):
        assert (root / folder / "encoder.json").is_file()  # the writer is recorded


def test_the_converted_emotion_llama_tests_on_raw_clips_with_eva_online(
    released,  # noqa: F811
    eva_file,
    workdir,
):
    lm_dir, path, _ = released
    data_file = workdir / "mer_data.yaml"
    data_file.write_text(yaml.safe_dump(mer_data(workdir, EVA_STREAMS + STORED)))
    args = convert(lm_dir, path, workdir / "online")
    args[args.index("--data") + 1] = str(data_file)
    assert main([*args, "--eva_weights", str(eva_file)]) == 0
    test_yaml = workdir / "online" / "test.yaml"
    config = yaml.safe_load(test_yaml.read_text())
    data = config["data"]["init_args"]
    assert data["source"] == "media" and data["stored_streams"] == ["face", "video", "audio"]
    assert data["media"]["strategy"] == "first" and data["media"]["interpolation"] == "bicubic"
    eva = config["model"]["init_args"]["encoders"]["image"]["init_args"]
    assert eva["weights"] == str(eva_file.resolve()) and eva["ln_vision"] is None
    # The tiny architecture in place of ViT-g/14 at 448 px (the rest is as written).
    eva.update(config=TINY, image_size=SIZE)
    data["media"]["frame_size"] = SIZE
    test_yaml.write_text(yaml.safe_dump(config))
    ckpt = str(workdir / "online" / "emotion_llama.ckpt")
    online = main(["test", "--config", str(test_yaml), "--ckpt_path", ckpt])
    assert online.trainer.state.finished and online.datamodule.source == "media"
    assert type(online.model.encoders["image"]).__name__ == "EVACLIPGEncoder"
    # Its online features are the ones extract stores; the stored-feature configs (no
    # --eva_weights) on that store give the same test metrics.
    extract = workdir / "extract.yaml"
    extract.write_text(yaml.safe_dump({
        "data": {**config["data"], "init_args": {**data, "stored_streams": None}},
        "encoders": config["model"]["init_args"]["encoders"], "progress": False,
    }))  # fmt: skip
    assert main(["extract", "--config", str(extract)]) == 0
    batch = next(iter(online.datamodule.test_dataloader()))
    with torch.no_grad():
        features = online.model.encode_batch(batch)["features"]
    root = workdir / "mer2023_tiny"
    for row, name in enumerate(batch["names"]):
        stored = np.load(root / "eva_clip_g_cls" / f"{name}.npy")
        assert np.abs(features["cls"][row].numpy() - stored).max() < 1e-6
        stored_face = np.load(root / "mae_340_UTT" / f"{name}.npy")
        assert np.array_equal(features["face"][row].numpy(), stored_face)
    args = convert(lm_dir, path, workdir / "stored")
    args[args.index("--data") + 1] = str(data_file)
    assert main(args) == 0
    stored_yaml = workdir / "stored" / "test.yaml"
    assert "encoders" not in yaml.safe_load(stored_yaml.read_text())["model"]["init_args"]
    offline = main(["test", "--config", str(stored_yaml), "--ckpt_path", ckpt])
    metrics, expected = offline.trainer.callback_metrics, online.trainer.callback_metrics
    assert "test/acc" in expected and offline.datamodule.source == "features"
    for key in [k for k in expected if k.startswith("test/")]:
        assert float(metrics[key]) == pytest.approx(float(expected[key]), abs=1e-6), key


def test_the_converter_passes_a_released_ln_vision_on_and_refuses_bad_eva_options(
    released,  # noqa: F811
    eva_file,
    workdir,
    capsys,
):
    lm_dir, path, state = released
    ln = {"ln_vision.weight": torch.ones(EVA), "ln_vision.bias": torch.zeros(EVA)}
    with_ln = workdir / "with_ln.pth"
    torch.save({"model": {**state, **ln}}, with_ln)
    assert main([*convert(lm_dir, with_ln, workdir / "a"), "--eva_weights", str(eva_file)]) == 0
    config = yaml.safe_load((workdir / "a" / "fit_mose.yaml").read_text())
    eva = config["model"]["init_args"]["encoders"]["image"]["init_args"]
    assert eva["ln_vision"] == str(with_ln.resolve())  # read by the encoder, not the LLM ckpt
    saved = torch.load(workdir / "a" / "emotion_llama.ckpt", weights_only=True)["state_dict"]
    assert not any("ln_vision" in k for k in saved)
    half = workdir / "half.pth"
    torch.save({"model": {**state, "ln_vision.weight": torch.ones(EVA)}}, half)
    line = expect_user_error(capsys, convert(lm_dir, half, workdir / "b"))
    assert str(half) in line and "ln_vision.bias" in line and "missing" in line
    argv = [*convert(lm_dir, path, workdir / "c"), "--eva_weights", "BAAI/EVA-CLIP-g"]
    line = expect_user_error(capsys, argv)
    assert "--eva_weights" in line and "eva_vit_g.pth" in line and not (workdir / "c").exists()
