"""AR as a Lightning callback, against a minimal LightningModule shaped like the real one.

The module has ``.model.backbone`` (a tiny Llama, optionally peft-wrapped), ``.model.
modality_context`` and optionally ``.adapter``; that is all the callback relies on.
"""

import json

import lightning.pytorch as pl
import mlflow
import pytest
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from src.callbacks.attention_reallocation import AttentionReallocation
from src.core.modality import Modality
from src.models.attention import build_reallocator, reallocated
from src.models.modality_context import ModalityContext
from tests.backbones import ReadyLM

T, A, V, P = (int(Modality.TEXT), int(Modality.AUDIO), int(Modality.VISUAL), int(Modality.PAD))
LAYOUTS = [
    [T, A, V, V, V, V, T, T, T, T],
    [T, V, V, V, A, T, T, T, P, P],
    [A, V, V, V, V, V, T, T, T, P],
    [T, T, V, V, V, A, T, T, T, T],
]


class ToyData(Dataset):
    """Eight right-padded samples with audio/visual/text spans in varying places."""

    def __init__(self, size: int = 8) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(size):
            ids = torch.tensor(LAYOUTS[i % len(LAYOUTS)])
            mask = (ids != P).long()
            tokens = torch.randint(3, 64, ids.shape, generator=generator) * mask
            label = torch.randint(3, 64, (), generator=generator)
            self.items.append(
                {"input_ids": tokens, "attention_mask": mask, "modality_ids": ids, "labels": label}
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class TinyMultimodal(nn.Module):
    def __init__(self, peft: bool = False) -> None:
        super().__init__()
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            initializer_range=0.2,
            attn_implementation="sdpa",
        )
        torch.manual_seed(0)
        self.backbone = LlamaForCausalLM(config)
        if peft:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
            self.backbone = get_peft_model(self.backbone, lora)
        self.backbone = ReadyLM(self.backbone)
        self.modality_context = ModalityContext()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.modality_context.bind(batch["modality_ids"]):
            return self.backbone.language_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits


class ToyAdapter:
    def __init__(self, weights: dict[str, float] | None) -> None:
        self.weights = weights

    def modality_weights(self) -> dict[str, float] | None:
        return self.weights


def attn_implementation(module: "ToyModule") -> str:
    backbone = module.model.backbone.language_model
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return base.config._attn_implementation


class ToyModule(pl.LightningModule):
    def __init__(self, peft: bool = False, adapter: ToyAdapter | None = None, fail: bool = False):
        super().__init__()
        self.model = TinyMultimodal(peft)
        self.adapter = adapter
        self.fail = fail
        self.implementations: dict[str, set[str]] = {}

    def _loss(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        self.implementations.setdefault(stage, set()).add(attn_implementation(self))
        logits = self.model(batch)
        last = batch["attention_mask"].sum(1) - 1
        final = logits[torch.arange(len(last)), last]
        return nn.functional.cross_entropy(final, batch["labels"])

    def training_step(self, batch, batch_idx):
        return self._loss(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch, "val"))

    def test_step(self, batch, batch_idx):
        if self.fail:
            raise ValueError("boom")
        self.log("test/loss", self._loss(batch, "test"), sync_dist=True)

    def predict_step(self, batch, batch_idx):
        self.implementations.setdefault("predict", set()).add(attn_implementation(self))
        return self.model(batch)[:, -1].argmax(-1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(ToyData(), batch_size=4)

    def val_dataloader(self):
        return DataLoader(ToyData(4), batch_size=2)

    def test_dataloader(self):
        return DataLoader(ToyData(), batch_size=2)

    def predict_dataloader(self):
        return DataLoader(ToyData(4), batch_size=2)


def trainer(tmp_path, callback, **kwargs) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=[callback], **options)


def direct_shares(module: ToyModule, settings: dict) -> dict[str, dict[str, float]]:
    """The same test data through the core Reallocator, without Lightning."""
    reallocator = build_reallocator(**settings)
    model = module.model
    reallocator.bind(model.modality_context, 2, {"audio": 2.0, "visual": 1.0})
    model.eval()
    with torch.no_grad(), reallocated(model.backbone.language_model, reallocator):
        for batch in DataLoader(ToyData(), batch_size=2):
            model(batch)
    return reallocator.monitor.summary()


SETTINGS = {"mode": "span_mass", "target": "fixed", "audio_share": 0.05, "layers": [1]}


def test_trainer_test_reallocates_logs_and_restores(tmp_path):
    module = ToyModule()
    callback = AttentionReallocation(build_reallocator(**SETTINGS))
    (results,) = trainer(tmp_path, callback).test(module)
    assert module.implementations["test"] == {callback.name}
    assert attn_implementation(module) == "sdpa"
    assert not callback.active
    assert callback.reallocator.calls == 4 * 2  # 4 batches x 2 layers
    expected = direct_shares(ToyModule(), SETTINGS)
    for modality in ("audio", "visual", "text"):
        after = results[f"test/attn_share/{modality}"]
        before = results[f"test/attn_share_before/{modality}"]
        assert after == pytest.approx(expected["after"][modality], abs=1e-6)
        assert before == pytest.approx(expected["before"][modality], abs=1e-6)
    assert results["test/attn_share/audio"] != pytest.approx(
        results["test/attn_share_before/audio"]
    )
    assert (tmp_path / "attention_share.png").stat().st_size > 0
    table = json.loads((tmp_path / "attention_share.json").read_text())
    assert table["count"][0] == table["count"][1] > 0
    assert table["before"][0] == table["after"][0]  # layer 0 is monitored but not reallocated


def test_never_active_during_fit(tmp_path):
    module = ToyModule()
    callback = AttentionReallocation(
        build_reallocator(mode="reweight", multipliers={"visual": 3.0})
    )
    run = trainer(tmp_path, callback, max_epochs=1, limit_train_batches=2, limit_val_batches=2)
    run.fit(module)
    assert module.implementations["train"] == {"sdpa"}
    assert module.implementations["val"] == {"sdpa"}
    assert callback.reallocator.calls == 0
    run.test(module)
    assert module.implementations["test"] == {callback.name}
    calls = callback.reallocator.calls
    assert calls > 0
    # A second fit after testing runs plain attention again.
    module.implementations.clear()
    again = trainer(tmp_path, callback, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    again.fit(module)
    assert module.implementations["train"] == {"sdpa"}
    assert callback.reallocator.calls == calls


def test_restored_after_exception(tmp_path):
    module = ToyModule(fail=True)
    callback = AttentionReallocation()
    with pytest.raises(ValueError, match="boom"):
        trainer(tmp_path, callback).test(module)
    assert attn_implementation(module) == "sdpa"
    assert not callback.active


def test_predict_with_peft_backbone(tmp_path):
    module = ToyModule(peft=True)
    callback = AttentionReallocation(
        build_reallocator(mode="logit_scale", alpha=0.5, query_rows="last")
    )
    predictions = trainer(tmp_path, callback).predict(module)
    assert len(predictions) == 2
    assert module.implementations["predict"] == {callback.name}
    assert attn_implementation(module) == "sdpa"
    assert (tmp_path / "attention_share_predict.png").exists()


def test_from_adapter_target(tmp_path):
    callback = AttentionReallocation(build_reallocator(mode="span_mass", target="from_adapter"))
    (results,) = trainer(tmp_path, callback).test(
        ToyModule(adapter=ToyAdapter({"audio": 2.0, "visual": 1.0}))
    )
    expected = direct_shares(ToyModule(), {"mode": "span_mass", "target": "from_adapter"})
    assert results["test/attn_share/audio"] == pytest.approx(expected["after"]["audio"], abs=1e-6)
    with pytest.raises(ValueError, match="modality weights"):
        trainer(tmp_path, callback).test(ToyModule(adapter=ToyAdapter(None)))
    with pytest.raises(AttributeError, match="modality_context"):
        broken = ToyModule()
        del broken.model.modality_context
        trainer(tmp_path, AttentionReallocation()).test(broken)


def test_mlflow_artifacts(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(
        experiment_name="ar", tracking_uri=uri, artifact_location=str(tmp_path / "artifacts")
    )
    callback = AttentionReallocation(build_reallocator(mode="reweight", multipliers={"audio": 0.5}))
    trainer(tmp_path, callback, logger=logger).test(ToyModule())
    client = mlflow.MlflowClient(uri)
    artifacts = {a.path for a in client.list_artifacts(logger.run_id)}
    assert {"attention_share.png", "attention_share.json"} <= artifacts
    metrics = client.get_run(logger.run_id).data.metrics
    assert 0.0 < metrics["test/attn_share/audio"] < metrics["test/attn_share_before/audio"]


@pytest.mark.slow
def test_ddp_spawn_reduces_shares_across_processes(tmp_path):
    callback = AttentionReallocation(build_reallocator(**SETTINGS))
    run = trainer(tmp_path, callback, devices=2, strategy="ddp_spawn")
    (results,) = run.test(ToyModule())
    expected = direct_shares(ToyModule(), SETTINGS)
    for modality in ("audio", "visual", "text"):
        got = results[f"test/attn_share/{modality}"]
        assert got == pytest.approx(expected["after"][modality], abs=1e-6)
    # The plot's table (written by rank zero) holds the rows of both processes.
    table = json.loads((tmp_path / "attention_share.json").read_text())
    assert table["count"] == direct_counts(SETTINGS)


def direct_counts(settings: dict) -> list[float]:
    """Monitored entries per layer for the whole test set in one process."""
    reallocator = build_reallocator(**settings)
    model = ToyModule().model
    reallocator.bind(model.modality_context, 2)
    model.eval()
    with torch.no_grad(), reallocated(model.backbone.language_model, reallocator):
        for batch in DataLoader(ToyData(), batch_size=2):
            model(batch)
    return reallocator.monitor.count.tolist()


def test_config_fragment_builds_the_callback():
    """conf/callbacks/attention_reallocation.yaml (the AR entry of conf/method/{lora_ar,mosear})
    parses and instantiates through jsonargparse, as LightningCLI does for trainer.callbacks."""
    from pathlib import Path

    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.callbacks import Callback

    path = Path(__file__).parents[2] / "conf" / "callbacks" / "attention_reallocation.yaml"
    entry = yaml.safe_load(path.read_text())
    parser = ArgumentParser()
    parser.add_argument("--callback", type=Callback)
    config = parser.parse_object({"callback": entry})
    callback = parser.instantiate_classes(config).callback
    assert isinstance(callback, AttentionReallocation)
    args = entry["init_args"]["reallocator"]["init_args"]
    assert callback.reallocator.name == "reweight"
    assert callback.reallocator.multipliers == args["multipliers"]
    assert callback.reallocator.query_rows == args["query_rows"]
    assert callback.calibration is None
