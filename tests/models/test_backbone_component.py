"""The backbone is a component chosen by ``class_path``: a new kind plugs in without editing the
Lightning module; its settings travel with checkpoints as data; its prompt format is enforced."""

import pytest
import torch
import yaml

from src.cli import main
from src.models.backbones.projected_causal_lm import ProjectedCausalLM
from tests.conftest import TINY_CONFIG
from tests.fault_injection import expect_user_error

AR = ["--trainer.callbacks+=src.callbacks.attention_reallocation.AttentionReallocation"]
SHORT = ["--trainer.limit_train_batches", "2", "--trainer.num_sanity_val_steps", "0"]


def config_with_backbone(folder, class_path: str, **init_args) -> str:
    """The tiny config with its backbone replaced by ``class_path`` (same LM recipe)."""
    config = yaml.safe_load(TINY_CONFIG.read_text())
    recipe = config["model"]["init_args"]["backbone"]["init_args"]["config"]
    config["model"]["init_args"]["backbone"] = {
        "class_path": class_path,
        "init_args": {"config": recipe, **init_args},
    }
    path = folder / "custom.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_new_kind_of_backbone_fits_and_tests_with_ar_through_the_cli(workdir):
    config = config_with_backbone(workdir, "tests.backbones.ModalityEmbeddedLM", seed=3)
    fit = main(["fit", "--config", config, *SHORT, "--test_after_fit", "false"])
    assert fit.trainer.state.finished and fit.trainer.global_step == 2
    backbone = fit.model.model.backbone
    assert type(backbone).__name__ == "ModalityEmbeddedLM"
    # Its own parameters train (and join their modality's optimizer group) beside LoRA's.
    groups = {g["name"]: {id(p) for p in g["params"]} for g in fit.model.param_groups()}
    assert id(backbone.type_embedding["audio"]) in groups["audio"]
    best = fit.trainer.checkpoint_callback.best_model_path
    saved = torch.load(best, weights_only=True)
    assert "model.backbone.type_embedding.audio" in saved["state_dict"]
    assert any("lora_A" in k for k in saved["state_dict"])
    assert not any(k.endswith("embed_tokens.weight") for k in saved["state_dict"])  # frozen
    assert saved["hyper_parameters"]["backbone"] == {
        "class": "tests.backbones.ModalityEmbeddedLM",
        "settings": {"config": backbone.config, "seed": 3, "prompt_format": "auto"},
    }
    tested = main(["test", "--config", config, *AR, "--ckpt_path", best])
    metrics = tested.trainer.callback_metrics
    trained = tested.model.model.backbone.type_embedding["audio"].detach()
    assert torch.equal(trained, saved["state_dict"]["model.backbone.type_embedding.audio"])
    before = float(metrics["test/attn_share_before/audio"])
    assert 0.0 < float(metrics["test/attn_share/audio"]) < before  # AR acted on its LM


def test_the_checkpoint_rebuilds_its_own_backbone_settings(workdir):
    config = config_with_backbone(
        workdir, "src.models.backbones.projected_causal_lm.ProjectedCausalLM", seed=5
    )
    fit = main(["fit", "--config", config, *SHORT, "--test_after_fit", "false"])
    best = fit.trainer.checkpoint_callback.best_model_path
    # Tested with the plain tiny config (seed 0): the frozen LM is rebuilt with seed 5.
    tested = main(["test", "--config", str(TINY_CONFIG), "--ckpt_path", best])
    assert tested.model.model.backbone.seed == 5
    lm_fit, lm_test = fit.model.model.language_model, tested.model.model.language_model
    assert torch.equal(lm_fit.get_input_embeddings().weight, lm_test.get_input_embeddings().weight)


def test_a_backbone_trained_on_one_prompt_format_refuses_another(workdir, capsys):
    config = config_with_backbone(
        workdir, "tests.backbones.ModalityEmbeddedLM", prompt_format="inst"
    )
    line = expect_user_error(capsys, ["fit", "--config", config, *SHORT])
    assert "model.backbone.prompt_format is 'inst'" in line
    assert "--data.init_args.prompt_format inst" in line
    fit = main(["fit", "--config", config, *SHORT, "--data.init_args.prompt_format", "inst",
                "--trainer.max_steps", "1", "--test_after_fit", "false"])  # fmt: skip
    assert fit.trainer.state.finished


def test_the_protocol_members_of_the_projected_causal_lm(workdir):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from src.core.streams import StreamSpec

    vocab = {f"w{i}": i for i in range(40)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "w0")))
    streams = [StreamSpec("audio", "a", "audio", 8, 1), StreamSpec("face", "f", "visual", 8, 3)]
    recipe = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3,
              "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    backbone = ProjectedCausalLM(config=recipe)
    assert not backbone.is_built
    backbone.build(tok, streams)
    assert len(backbone.layers()) == 3 and backbone.attention_model() is backbone.language_model
    assert backbone.input_embeddings().num_embeddings == 40 and backbone.hidden_size == 16
    assert not any(p.requires_grad for p in backbone.language_model.parameters())
    groups = backbone.modality_parameters()
    assert {id(p) for p in groups["visual"]} == {
        id(p) for p in backbone.projectors["face"].parameters()
    }
    ids = torch.tensor([[1, 0, 0, 0, 0, 2]])
    stream_ids = torch.tensor([[-1, 0, 1, 1, 1, -1]])
    feats = {"audio": torch.randn(1, 8), "face": torch.randn(1, 8)}
    embeds = backbone.embed(ids, stream_ids, feats)
    assert torch.allclose(embeds[0, 1], backbone.projectors["audio"](feats["audio"])[0, 0])
    assert torch.equal(embeds[0, 0], backbone.input_embeddings().weight[1])
    # Settings are plain and rebuild the same object.
    assert ProjectedCausalLM(**backbone.settings()).settings() == backbone.settings()
    with pytest.raises(RuntimeError, match="already called"):
        backbone.build(tok, streams)
