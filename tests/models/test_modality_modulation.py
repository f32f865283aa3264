"""MoSE weights that act (issue 14): a dominance signal that moves, per-modality learning-rate
groups that scale the update, and the two LoRA baselines (modality dropout, OGM-GE)."""

import math

import mlflow
import pytest
import torch

from src.cli import main
from src.core.modality import Modality
from src.models.adapters.modality_dropout import ModalityDropoutLoRAAdapter
from src.models.adapters.ogm_ge import OGMGELoRAAdapter
from src.models.modality_weights import DominanceModalityWeights
from tests.conftest import REPO, TINY_CONFIG

K = 6


class FixedScorer:
    """Unimodal scores with known gold-label probabilities: audio 0.27, visual 0.21 (chance 1/6),
    the compressed confidences the issue measured on the fused model."""

    training = True

    def __init__(self, p_audio: float = 0.27, p_visual: float = 0.21) -> None:
        self.p = {Modality.VISUAL: p_audio, Modality.AUDIO: p_visual}  # keyed by what is dropped

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def score_labels(self, batch, drop_modalities=()):
        gold = self.p[drop_modalities[0]]
        n = len(batch["labels"])
        probs = torch.full((n, K), (1 - gold) / (K - 1))
        probs[torch.arange(n), batch["labels"]] = gold
        return probs.log()


class WrongVisualScorer(FixedScorer):
    """Visual alone answers every other sample wrongly (a distractor label above the gold)."""

    def score_labels(self, batch, drop_modalities=()):
        scores = super().score_labels(batch, drop_modalities)
        if drop_modalities[0] == Modality.AUDIO:
            rows = torch.arange(0, len(scores), 2)
            scores[rows, (batch["labels"][rows] + 1) % K] = 0.0
        return scores


def moved_weights(signal: str, scorer: FixedScorer) -> dict[str, float]:
    batch = {"labels": torch.arange(8) % K}
    weights = DominanceModalityWeights(alpha=0.5, momentum=0.9, signal=signal)
    for step in range(40):
        weights.update(scorer, batch, step)
    w = weights.as_dict()
    assert w["audio"] + w["visual"] == pytest.approx(2.0)
    return {**w, "rho": weights.last_measurement[2]}


def test_dominance_weights_move_with_log_likelihood_over_chance():
    confidence = moved_weights("confidence", FixedScorer())
    loglik = moved_weights("loglik", FixedScorer())
    # Audio dominates: shrunk. Confidence barely moves (ratio 0.27/0.21, the 0.89);
    # the log-likelihood over chance sees the ratio of the distances from chance.
    assert confidence["audio"] < 1.0 and 1 - confidence["audio"] < 0.15
    assert loglik["rho"] == pytest.approx(math.log(0.27 * K) / math.log(0.21 * K), rel=1e-4)
    assert loglik["audio"] < 1.0 - 2 * (1 - confidence["audio"])


def test_dominance_weights_move_with_unimodal_accuracy_over_chance():
    w = moved_weights("accuracy", WrongVisualScorer())
    assert w["rho"] == pytest.approx((1 - 1 / K) / (0.5 - 1 / K), rel=1e-4)
    assert w["audio"] < 0.5 < 1.5 < w["visual"]


def test_ogm_ge_coefficients_slow_only_the_dominant_modality():
    adapter = OGMGELoRAAdapter(ogm_alpha=0.5, signal="loglik")
    batch = {"labels": torch.arange(8) % K}
    adapter.on_train_batch_start(FixedScorer(), batch, 0)
    scales = adapter.lr_scales()
    rho = math.log(0.27 * K) / math.log(0.21 * K)
    assert scales["audio"] == pytest.approx(1 - math.tanh(0.5 * (rho - 1)), rel=1e-4)
    assert scales["visual"] == 1.0  # OGM-GE leaves the weaker modality alone
    assert adapter.figures()["modality_weights.png"] is not None


def test_modality_dropout_masks_one_modality_of_the_dropped_samples():
    ids = torch.tensor([[0, 1, 2, 2, 2, 0]] * 200)
    batch = {"modality_ids": ids, "attention_mask": torch.ones_like(ids)}
    adapter = ModalityDropoutLoRAAdapter(p=0.3, seed=1)
    out = adapter.prepare_train_batch(None, batch, step=5)
    masked = out["attention_mask"] == 0
    dropped = masked.any(1)
    assert 0.2 < float(dropped.float().mean()) < 0.4
    for row in masked[dropped]:
        gone = set(ids[0][row].tolist())
        assert gone in ({1}, {2}) and (gone != {2} or int(row.sum()) == 3)  # the whole modality
    assert not masked[:, [0, 5]].any()  # text always stays
    again = adapter.prepare_train_batch(None, batch, step=5)
    assert torch.equal(again["attention_mask"], out["attention_mask"])  # seeded by step


def test_per_modality_lr_groups_exist_and_scale_the_update(workdir):
    mose = str(REPO / "conf/adapter/mose.yaml")
    args = "--model.init_args.adapter.init_args."
    cli = main(
        ["fit", "--config", str(TINY_CONFIG), "--model.init_args.adapter", mose,
         f"{args}modality_weighting", "dominance", f"{args}dominance_signal", "loglik",
         f"{args}modulate_lr", "true", "--test_after_fit", "false"]
    )  # fmt: skip
    module = cli.model
    groups = {g["name"]: g for g in cli.trainer.optimizers[0].param_groups}
    assert set(groups) == {"audio", "visual", "shared"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert {id(p) for p in module.model.backbone.projectors["audio"].parameters()} <= ids["audio"]
    assert {id(p) for p in module.model.backbone.projectors["face"].parameters()} <= ids["visual"]
    experts = module.adapter.mose_layers[0].experts
    assert id(experts["audio"]) in ids["audio"] and id(experts["visual"]) in ids["visual"]
    assert id(experts["text"]) in ids["shared"]
    # The weights moved during fit and were logged, with their trajectory plot.
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["tests"]).iloc[0]
    assert "metrics.train/lr_scale/audio" in run
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id)}
    assert "modality_weights.png" in artifacts
    # One AdamW step from fresh moments moves every parameter by ~lr: the audio group by
    # lr * w_audio, the visual group by lr * w_visual, the rest by lr.
    module.adapter.weights._w.copy_(torch.tensor([0.5, 1.5]))
    optimizer = module.configure_optimizers()
    before = {id(p): p.detach().clone() for g in optimizer.param_groups for p in g["params"]}
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    module.optimizer_step(0, 0, optimizer, lambda: None)
    for name, scale in (("audio", 0.5), ("visual", 1.5), ("shared", 1.0)):
        group = next(g for g in optimizer.param_groups if g["name"] == name)
        steps = torch.cat([(before[id(p)] - p.detach()).flatten() for p in group["params"]])
        assert steps.abs().mean().item() == pytest.approx(module.lr * scale, rel=1e-3), name
        assert group["lr"] == module.lr  # restored after the step


def test_mose_unimodal_loss_trains_each_modality_alone(workdir):
    mose = str(REPO / "conf/adapter/mose.yaml")
    args = "--model.init_args.adapter.init_args."
    cli = main(
        ["fit", "--config", str(TINY_CONFIG), "--model.init_args.adapter", mose,
         f"{args}unimodal_loss_weight", "0.5", "--trainer.max_steps", "2",
         "--test_after_fit", "false"]
    )  # fmt: skip
    metrics = cli.trainer.callback_metrics
    assert {"train/unimodal_loss/visual_only", "train/unimodal_loss/audio_only"} <= set(metrics)
    module, adapter = cli.model, cli.model.adapter
    llm = module.model.train()
    batch = next(iter(cli.datamodule.train_dataloader()))
    adapter.on_train_batch_start(llm, batch, 100)
    term = adapter._unimodal_loss.detach()
    visual_only = llm.lm_loss(batch, drop_modalities=(Modality.AUDIO,))
    audio_only = llm.lm_loss(batch, drop_modalities=(Modality.VISUAL,))
    assert float(term) == pytest.approx(0.5 * float(visual_only + audio_only) / 2, rel=1e-5)
    # The visual-only loss does not see audio at all: other audio features, the same loss.
    noisy = {**batch, "features": {**batch["features"], "audio": torch.randn_like(
        batch["features"]["audio"]) * 10}}  # fmt: skip
    assert float(llm.lm_loss(noisy, drop_modalities=(Modality.AUDIO,))) == pytest.approx(
        float(visual_only), rel=1e-5
    )
    assert float(llm.lm_loss(noisy)) != pytest.approx(float(llm.lm_loss(batch)), rel=1e-5)
    # It is returned with the gating loss and trains the visual experts.
    module.zero_grad()
    adapter.auxiliary_loss().backward()
    # (Through v_proj: in the 1-layer tiny LM a visual token's query never reaches the answer.)
    grads = [layer.experts["visual"].grad for layer in adapter.mose_layers]
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    with pytest.raises(ValueError, match="unimodal_loss_weight"):
        type(adapter)(unimodal_loss_weight=-1.0)
