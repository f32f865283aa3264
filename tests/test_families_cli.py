"""Bring your own LLM: every common Hugging Face family, from a local directory, default settings.

Each family is a tiny random checkpoint saved with ``save_pretrained`` beside a byte-level BPE
tokenizer trained in the test (``tests/families.py``); the real CLI fits it with LoRA and with
MoSE (default targets: the family's own attention projections) and tests the LoRA checkpoint
with AR. Falcon cannot switch its attention implementation: AR is refused before any training.
"""

from pathlib import Path

import pytest
import torch

from src.cli import main
from src.models.adapters.targets import TargetsNotFoundError
from src.models.mose import mose_layers
from tests.conftest import REPO, TINY_CONFIG
from tests.families import save_family

MOSE = str(REPO / "tests/conf/mose.yaml")
AR = ["--trainer.callbacks+=src.callbacks.attention_reallocation.AttentionReallocation"]
SHORT = [
    "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    "--trainer.limit_test_batches", "1", "--trainer.num_sanity_val_steps", "0",
]  # fmt: skip

#: family -> the module names its default targets adapt.
FAMILY_TARGETS = {
    "llama": {"q_proj", "v_proj"},
    "mistral": {"q_proj", "v_proj"},
    "qwen2": {"q_proj", "v_proj"},
    "phi3": {"qkv_proj"},
    "gpt_neox": {"query_key_value"},
    "falcon": {"query_key_value"},
    "gpt2": {"c_attn"},
    "gemma": {"q_proj", "v_proj"},
    "gemma2": {"q_proj", "v_proj"},
}


def local_model(checkpoint: Path) -> list[str]:
    """The tiny config pointed at a local checkpoint directory (model and tokenizer)."""
    return [
        "--config", str(TINY_CONFIG),
        "--model.init_args.backbone.init_args.path", str(checkpoint),
        "--data.init_args.tokenizer", str(checkpoint),
        *SHORT,
    ]  # fmt: skip


def error_lines(stderr: str) -> list[str]:
    """The CLI's error lines (stderr also carries the weight-loading progress bar)."""
    return [line for line in stderr.splitlines() if "error:" in line]


def adapted(backbone: torch.nn.Module, marker: str) -> set[str]:
    """Last name components of the modules holding ``marker`` parameters (``lora_A``...)."""
    return {
        name.split(f".{marker}")[0].rsplit(".", 1)[-1]
        for name, _ in backbone.named_parameters()
        if f".{marker}" in name
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
def test_family_fits_with_lora_and_mose_and_tests_with_ar(workdir, capsys, family):
    checkpoint = save_family(family, workdir / "checkpoint")
    args = local_model(checkpoint)

    lora = main(["fit", *args, "--test_after_fit", "false"])
    assert lora.trainer.state.finished and lora.trainer.global_step == 2
    assert adapted(lora.model.model.language_model, "lora_A") == FAMILY_TARGETS[family]
    best = lora.trainer.checkpoint_callback.best_model_path

    mose = main(["fit", *args, "--config", MOSE, "--test_after_fit", "false"])
    assert mose.trainer.state.finished
    names = {n.rsplit(".", 1)[-1] for n, _ in mose_layers(mose.model.model.language_model)}
    assert names == FAMILY_TARGETS[family]

    if family == "falcon":
        capsys.readouterr()
        assert main(["test", *args, *AR, "--ckpt_path", best]) == 2
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and "cannot run on falcon" in errors[0]
        # Refused before fit, not after it: no training step, no new checkpoint.
        before = set(workdir.rglob("*.ckpt"))
        assert main(["fit", *args, *AR]) == 2
        assert set(workdir.rglob("*.ckpt")) == before
        return
    tested = main(["test", *args, *AR, "--ckpt_path", best])
    metrics = tested.trainer.callback_metrics
    before, after = (
        float(metrics["test/attn_share_before/audio"]),
        float(metrics["test/attn_share/audio"]),
    )
    assert 0.0 < after < before < 1.0  # AR (halving audio's weights) acted in this family


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["nonexistent"]])
def test_targets_not_found_is_one_line_naming_family_and_modules(workdir, capsys, targets):
    checkpoint = save_family("gpt_neox", workdir / "checkpoint")
    option = ["--model.init_args.adapter.init_args.target_modules", str(targets)]
    assert main(["fit", *local_model(checkpoint), *option]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    err = errors[0]
    assert str(targets[0]) in err and "gpt_neox" in err and "query_key_value" in err
    assert "Union" not in err and "Given value" not in err


def test_all_linear_adapts_every_linear_layer_but_the_head(workdir):
    checkpoint = save_family("llama", workdir / "checkpoint")
    option = ["--model.init_args.adapter.init_args.target_modules", "all-linear"]
    for extra in ([], ["--config", MOSE]):
        cli = main(["fit", *local_model(checkpoint), *extra, *option, "--trainer.fast_dev_run=1"])
        backbone = cli.model.model.language_model
        names = adapted(backbone, "lora_A") | {
            n.rsplit(".", 1)[-1] for n, _ in mose_layers(backbone)
        }
        expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert names == expected


def test_targets_error_class_is_a_user_error():
    from src.core.errors import UserError

    assert issubclass(TargetsNotFoundError, UserError)
