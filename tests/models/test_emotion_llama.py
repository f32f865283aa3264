"""Emotion-LLaMA as a backbone: a tiny checkpoint in exactly the released key layout converts
through the CLI, the converted model's embeddings and logits equal a reference forward built
here from the raw tensors, and the converted checkpoint tests with and without AR and fine-tunes
with MoSE."""

import json
import pickle

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from src.cli import main
from src.core.label_space import MER2023
from src.data.components.prompt import PromptBuilder
from src.models.backbones.emotion_llama import TEMPLATES, merge_patch_tokens
from tests.conftest import REPO
from tests.families import save_family
from tests.fault_injection import expect_user_error

EVA, PATCHES, FEAT, RANK, ALPHA = 8, 16, 12, 4, 16.0  # EVA width, patch tokens, MAE/HuBERT dim
DATA = str(REPO / "tests" / "conf" / "emotion_llama_data.yaml")
#: The emotion instruction of Emotion-LLaMA's training set (its only one).
RELEASED_EMOTION_INSTRUCTION = (
    "Please determine which emotion label in the video represents: happy, sad, neutral, angry, "
    "worried, surprise, fear, contempt, doubt."
)
TRAINER = str(REPO / "conf" / "trainer" / "cpu.yaml")
SHORT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
         "--trainer.num_sanity_val_steps", "0"]  # fmt: skip


def released_state(lm_dir) -> dict[str, torch.Tensor]:
    """Tensors named exactly as Emotion-LLaMA's released .pth (peft 0.2 LoRA names), tiny."""
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir))
    hidden, g = lm.config.hidden_size, torch.Generator().manual_seed(1)
    state = {}
    for i, layer in enumerate(lm.model.layers):
        for target in ("q_proj", "v_proj"):
            out = getattr(layer.self_attn, target).out_features
            prefix = f"llama_model.base_model.model.model.layers.{i}.self_attn.{target}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=g) * 0.3
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, RANK, generator=g) * 0.3
    for role, dim in [("llama_proj", 4 * EVA), ("feats_llama_proj1", FEAT),
                      ("feats_llama_proj2", FEAT), ("feats_llama_proj3", FEAT),
                      ("cls_tk_llama_proj", EVA)]:  # fmt: skip
        state[f"{role}.weight"] = torch.randn(hidden, dim, generator=g) * 0.2
        state[f"{role}.bias"] = torch.randn(hidden, generator=g) * 0.2
    return state


@pytest.fixture
def released(workdir):
    lm_dir = save_family("llama", workdir / "llama2")
    state = released_state(lm_dir)
    path = workdir / "emotion_llama.pth"
    torch.save({"model": state}, path)
    return lm_dir, path, state


def convert(lm_dir, path, output) -> list[str]:
    return ["convert-emotion-llama", "--checkpoint", str(path), "--output", str(output),
            "--llama", str(lm_dir), "--patch_tokens", str(PATCHES // 4), "--dtype", "float32",
            "--data", DATA, "--trainer", TRAINER]  # fmt: skip


def reference_forward(lm_dir, state, subtitle, eva, face, video, audio):
    """Emotion-LLaMA's input embeddings and logits, from the raw tensors (no framework code):
    BOS, "[INST] <video>", the merged patch tokens through llama_proj, "</video> <feature>",
    face / video / audio through feats_llama_proj1..3 and the CLS token, then the rest of the
    instruction; each text segment tokenized on its own; LoRA merged as W + alpha/r B A."""
    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    lm = AutoModelForCausalLM.from_pretrained(str(lm_dir)).eval()

    def text(segment):
        return lm.get_input_embeddings()(
            torch.tensor(tok(segment, add_special_tokens=False).input_ids)
        )

    def linear(name, x):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    cls, patches = eva[0], eva[1:]
    merged = patches.view(PATCHES // 4, 4 * EVA)  # four consecutive patch tokens per row
    image = linear("llama_proj", merged)
    feats = torch.stack(
        [
            linear("feats_llama_proj1", face),
            linear("feats_llama_proj2", video),
            linear("feats_llama_proj3", audio),
            linear("cls_tk_llama_proj", cls),
        ]
    )
    # The released prompt, built as its data set and MiniGPT-v2 build it (first_face.py's
    # instruction inside "[INST] {} [/INST]"), then cut at its two placeholders.
    line = f"The person in video says: {subtitle}. "
    instruction = "<video><VideoHere></video> <feature><FeatureHere></feature> {} [{}] {} ".format(
        line, "emotion", RELEASED_EMOTION_INSTRUCTION
    )
    head, rest = f"[INST] {instruction} [/INST]".split("<VideoHere>")
    middle, tail = rest.split("<FeatureHere>")
    assert "  [emotion]" in tail and tail.endswith("  [/INST]")  # the released double spaces
    bos = lm.get_input_embeddings()(torch.tensor([tok.bos_token_id]))
    embeds = torch.cat([bos, text(head), image, text(middle), feats, text(tail)])[None]
    with torch.no_grad():
        for i, layer in enumerate(lm.model.layers):
            for target in ("q_proj", "v_proj"):
                key = f"llama_model.base_model.model.model.layers.{i}.self_attn.{target}"
                delta = state[f"{key}.lora_B.weight"] @ state[f"{key}.lora_A.weight"]
                getattr(layer.self_attn, target).weight += ALPHA / RANK * delta
        logits = lm(inputs_embeds=embeds).logits
    return embeds.detach(), logits


def test_the_converted_checkpoint_equals_emotion_llama_and_tests_with_ar(released, workdir):
    lm_dir, path, state = released
    assert main(convert(lm_dir, path, workdir / "converted")) == 0
    out = workdir / "converted"
    ckpt = str(out / "emotion_llama.ckpt")
    tested = main(["test", "--config", str(out / "test.yaml"), "--ckpt_path", ckpt])
    assert tested.trainer.state.finished
    backbone = tested.model.model.backbone.eval()
    assert type(backbone).__name__ == "EmotionLLaMA"

    torch.manual_seed(0)
    eva, face, video, audio = (torch.randn(1 + PATCHES, EVA), torch.randn(FEAT),
                               torch.randn(FEAT), torch.randn(FEAT))  # fmt: skip
    subtitle = "i am so happy today"
    ref_embeds, ref_logits = reference_forward(lm_dir, state, subtitle, eva, face, video, audio)

    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    streams = tested.model.model.streams
    prompt = PromptBuilder(tok, streams, MER2023.labels, TEMPLATES, "inst").encode(subtitle)
    patches, cls = merge_patch_tokens(eva[None])
    features = {"image": patches, "cls": cls, "face": face[None], "video": video[None],
                "audio": audio[None]}  # fmt: skip
    with torch.no_grad():
        embeds = backbone.embed(
            torch.tensor([prompt.input_ids]), torch.tensor([prompt.stream_ids]), features
        )
        logits = backbone.language_model(inputs_embeds=embeds).logits
    assert embeds.shape == ref_embeds.shape
    assert (embeds - ref_embeds).abs().max() < 1e-5
    assert (logits - ref_logits).abs().max() < 1e-4
    # Training the projectors is not needed to be "trained": the released weights load as is.
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(backbone.llama_proj.weight, saved["model.backbone.llama_proj.weight"])

    with_ar = main(["test", "--config", str(out / "test_ar_fixed.yaml"), "--ckpt_path", ckpt])
    metrics = with_ar.trainer.callback_metrics
    before = float(metrics["test/attn_share_before/audio"])
    assert 0.0 < float(metrics["test/attn_share/audio"]) < before  # AR acted on its LLaMA
    for subset in ("video_aligned", "audio_aligned", "consistent"):
        assert f"test/{subset}/acc" in metrics

    # Zero-shot AR: strategy, strength and gate chosen on the validation split of the frozen
    # released model (no training), stored beside the checkpoint and reused by the next test.
    calibrated = main(["test", "--config", str(out / "test_ar.yaml"), "--ckpt_path", ckpt])
    records = sorted(out.glob("emotion_llama.ar-*.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    labels = {row["label"] for row in record["entries"]}
    assert record["chosen"] in labels and len(labels) > 1
    assert "test/modality_gap" in calibrated.trainer.callback_metrics


def test_mose_fine_tunes_from_the_converted_checkpoint(released, workdir):
    lm_dir, path, state = released
    out = workdir / "converted"
    assert main(convert(lm_dir, path, out)) == 0
    fit = main(["fit", "--config", str(out / "fit_mose.yaml"), *SHORT,
                "--method.adapter.init_args.rank", "2", "--test_after_fit", "false"])  # fmt: skip
    assert fit.trainer.state.finished and fit.trainer.global_step == 2
    assert type(fit.model.adapter).__name__ == "MoSEAdapter"
    backbone = fit.model.model.backbone
    # The released LoRA is merged into the frozen LLaMA (no LoRA modules are left).
    base = AutoModelForCausalLM.from_pretrained(str(lm_dir))
    q = "llama_model.base_model.model.model.layers.0.self_attn.q_proj"
    merged = base.model.layers[0].self_attn.q_proj.weight + ALPHA / RANK * (
        state[f"{q}.lora_B.weight"] @ state[f"{q}.lora_A.weight"]
    )
    frozen = next(
        m for n, m in backbone.language_model.named_modules() if n.endswith("0.self_attn.q_proj")
    )
    weight = frozen.base_layer.weight if hasattr(frozen, "base_layer") else frozen.weight
    assert torch.allclose(weight, merged, atol=1e-6)
    assert not any("lora_A.default" in n for n, _ in backbone.language_model.named_parameters())
    best = fit.trainer.checkpoint_callback.best_model_path
    tested = main(["test", "--config", str(out / "fit_mose.yaml"), "--ckpt_path", best,
                   "--method.adapter.init_args.rank", "2"])  # fmt: skip
    assert tested.trainer.state.finished


class Hostile:
    def __reduce__(self):
        return (print, ("pwned",))


def test_a_hostile_or_foreign_checkpoint_is_refused_in_one_line(released, workdir, capsys):
    lm_dir, path, state = released
    evil = workdir / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": Hostile()}))
    line = expect_user_error(capsys, convert(lm_dir, evil, workdir / "a"))
    assert str(evil) in line and not (workdir / "a").exists()

    unknown = workdir / "unknown.pth"
    torch.save(
        {"model": {**state, "llama_model.base_model.model.lm_head.weight": torch.ones(2)}}, unknown
    )
    line = expect_user_error(capsys, convert(lm_dir, unknown, workdir / "b"))
    assert str(unknown) in line and "lm_head.weight" in line

    lora_key = "llama_model.base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    for gone in (lora_key, "cls_tk_llama_proj.bias"):
        partial = workdir / "partial.pth"
        torch.save({"model": {k: v for k, v in state.items() if k != gone}}, partial)
        line = expect_user_error(capsys, convert(lm_dir, partial, workdir / "c"))
        assert str(partial) in line and gone in line and "missing" in line

    (workdir / "taken").mkdir()
    (workdir / "taken" / "file").write_text("mine")
    line = expect_user_error(capsys, convert(lm_dir, path, workdir / "taken"))
    assert "--output" in line and (workdir / "taken" / "file").read_text() == "mine"


def test_the_written_configs_are_plain_yaml_with_the_released_layout(released, workdir):
    lm_dir, path, _ = released
    assert main(convert(lm_dir, path, workdir / "out")) == 0
    config = yaml.safe_load((workdir / "out" / "test.yaml").read_text())
    data = config["data"]["init_args"]
    assert [s["name"] for s in data["streams"]] == ["image", "face", "video", "audio", "cls"]
    assert data["streams"][0] == {"name": "image", "feature_dir": "eva_clip_g_patches",
                                  "modality": "visual", "dim": 4 * EVA, "tokens": PATCHES // 4,
                                  "sequence": True}  # fmt: skip
    assert data["prompt_format"] == "inst" and data["templates"] == TEMPLATES
    assert config["method"]["adapter"]["init_args"]["r"] == RANK
