"""A bfloat16 backbone trains and scores with or without bf16 autocast (trainer precision 32)."""

import pytest
import torch

from src.cli import main
from tests.conftest import REPO, TINY_CONFIG

MOSE = ["--config", str(REPO / "tests/conf/mose.yaml")]


@pytest.mark.parametrize(
    ("precision", "adapter"),
    [("32", []), ("32", MOSE), ("bf16-mixed", [])],
    ids=["lora-no-autocast", "mose-no-autocast", "lora-autocast"],
)
def test_bfloat16_backbone_fits_and_validates(workdir, adapter, precision):
    cli = main([
        "fit", "--config", str(TINY_CONFIG), *adapter, "--model.backbone.dtype", "bfloat16",
        "--trainer.precision", precision, "--trainer.limit_train_batches", "2",
        "--trainer.limit_val_batches", "1", "--test_after_fit", "false",
    ])  # fmt: skip
    assert cli.trainer.state.finished
    model = cli.model.model
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.backbone.projectors.parameters())
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert "val/acc" in cli.trainer.callback_metrics
