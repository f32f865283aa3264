"""AR as a Lightning callback: reallocate attention while testing or predicting, never in fit.

Configured under ``trainer.callbacks`` like any callback; the strategy is a ``class_path``::

    - class_path: src.callbacks.attention_reallocation.AttentionReallocation
      init_args:
        reallocator:
          class_path: src.models.attention.strategies.Reweight
          init_args: {multipliers: {audio: 0.5}, strength: 0.5, query_rows: text}
        calibration: {}          # choose strategy, strength and gate on validation instead

On ``on_test_start``/``on_predict_start`` it (optionally) calibrates on the validation split or
reuses the stored choice, binds the :class:`Reallocator` to ``pl_module.model.modality_context``
and switches the backbone's language model (``pl_module.model.backbone.attention_model()``) to
it through transformers' ``AttentionInterface``; ``on_*_end`` and ``on_exception`` switch back. With
``gate: conflict`` each batch first gets the audio-only and visual-only predictions (AR
suspended) and only disagreeing samples are reallocated. At the end of the epoch it logs the
attention share per modality (reduced over processes), the gate rate and a per-layer plot.

Metrics: ``<stage>/attn_share/<modality>`` is the share after reallocation (the attention the
model actually used), ``<stage>/attn_share_before/<modality>`` the share before; both averaged
over every monitored (sample, head, query row) of every layer. ``<stage>/ar/gate_rate``: the
fraction of samples reallocated; ``<stage>/ar/raised_over_relied``: 1 when the over-relied
modality's share went up (also a warning).
"""

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from src.io.atomic import atomic_write_text
from src.metrics.closed_set import EmotionMetrics
from src.models.attention.calibration import Calibration, read_record
from src.models.attention.conflict_gate import conflict_gate
from src.models.attention.interface import (
    check_switchable,
    install_reallocator,
    restore_attention,
    unique_name,
)
from src.models.attention.reallocator import Reallocator
from src.models.attention.spans import MONITORED
from src.models.attention.strategies import Reweight
from src.tracking.artifacts import log_dict, log_figure, mlflow_logger

FIGURE_FILES = {"test": "attention_share.png", "predict": "attention_share_predict.png"}
CALIBRATION_ARTIFACT = "ar_calibration.json"


class AttentionReallocation(Callback):
    """Attention reallocation (AR) between the audio and visual spans at test/predict time.

    Args:
        reallocator: the strategy (``class_path`` of a
            :class:`~src.models.attention.reallocator.Reallocator` subclass in
            ``src.models.attention.strategies``). Default: ``Reweight`` halving the over-relied
            modality's (audio's) post-softmax weights on the text rows of every layer. Ignored
            when ``calibration`` is set (the calibrated choice replaces it).
        calibration: choose strategy, strength and gate on the validation split
            (:class:`~src.models.attention.calibration.Calibration`); the choice is stored as
            ``<checkpoint stem>.ar-<signature>.json`` beside the checkpoint and in MLflow, and
            a later ``test``/``predict`` of that checkpoint reuses it.
        plot: log the per-layer plot (MLflow artifact, else a PNG in ``default_root_dir``).
    """

    def __init__(
        self,
        reallocator: Reallocator | None = None,
        calibration: Calibration | None = None,
        plot: bool = True,
    ) -> None:
        super().__init__()
        self.reallocator = reallocator if reallocator is not None else Reweight()
        self.calibration = calibration
        self.plot = plot
        self.name = unique_name()
        self.record: dict[str, Any] | None = None
        self._installed: tuple[torch.nn.Module, str] | None = None
        self._gate_counts = torch.zeros(2, dtype=torch.float64)

    @property
    def active(self) -> bool:
        """Whether the backbone currently runs the reallocating attention."""
        return self._installed is not None

    # ------------------------------------------------------------- activation

    def _activate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deactivate()  # a previous run that died without on_exception
        model = getattr(pl_module, "model", None)
        for attribute in ("backbone", "modality_context"):
            if not hasattr(model, attribute):
                raise AttributeError(
                    f"AttentionReallocation needs pl_module.model.{attribute}; "
                    f"{type(pl_module).__name__}.model has none"
                )
        if self.calibration is not None:
            self.reallocator = self._calibrated(trainer, pl_module)
        self._install(self.reallocator, pl_module)
        self._gate_counts = torch.zeros(2, dtype=torch.float64)

    def _install(self, reallocator: Reallocator, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        adapter = getattr(pl_module, "adapter", None)
        weights = adapter.modality_weights() if adapter is not None else None
        target = model.backbone.attention_model()
        reallocator.bind(model.modality_context, len(model.backbone.layers()), weights)
        original = install_reallocator(target, reallocator, self.name)
        self._installed = (target, original)

    def _deactivate(self) -> None:
        if self._installed is not None:
            backbone, original = self._installed
            self._installed = None
            restore_attention(backbone, self.name, original)
            self.reallocator.unbind()  # drop the reference to the module's context

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activate(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activate(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deactivate()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deactivate()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._deactivate()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before fit too: a backbone AR cannot switch is refused before the training, not after.
        model = getattr(pl_module, "model", None)
        if hasattr(model, "backbone"):
            check_switchable(model.backbone.attention_model())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # AR is inference-only: make sure nothing is left switched on when training begins.
        self._deactivate()

    # ------------------------------------------------------------ conflict gate

    def _gate(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if self.reallocator.gate != "conflict" or not self.active:
            return
        with self.reallocator.suspended():
            gate = conflict_gate(pl_module, batch)
        self.reallocator.set_sample_gate(gate)
        self._gate_counts += torch.tensor([float(gate.sum()), float(gate.numel())])

    def on_test_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._gate(pl_module, batch)

    def on_predict_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._gate(pl_module, batch)

    # -------------------------------------------------------------- calibration

    def _calibrated(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Reallocator:
        """The calibrated choice: reused from the record beside the checkpoint, else chosen on
        the validation split now (and stored)."""
        assert self.calibration is not None
        path = self.calibration.record_path(trainer.ckpt_path)
        if path is not None and path.is_file():
            record = read_record(path)
            chosen = self.calibration.lookup(record, path)
            source = f"reused {path.name}"
        else:
            record = self.calibrate(trainer, pl_module)
            chosen = self.calibration.entry(record["chosen"])
            source = "calibrated on validation"
            if path is not None and trainer.is_global_zero and not path.exists():
                atomic_write_text(path, json.dumps(record, indent=2))
        self.record = record
        if trainer.is_global_zero:
            print(f"AR: {chosen.label() if record['chosen'] != 'none' else 'none'} ({source})")
        self._log_record(trainer, record)
        return chosen

    def _validation_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list:
        """The validation split's batches, on the module's device. Only the validation
        dataloader is ever asked for: calibration never reads the test split."""
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        loader_fn = getattr(source, "val_dataloader", None)
        if not callable(loader_fn):
            raise RuntimeError(
                "AR calibration needs a validation split (val_dataloader); none is configured"
            )
        return [trainer.strategy.batch_to_device(b, pl_module.device) for b in loader_fn()]

    @torch.no_grad()
    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Score no AR and every grid entry on the validation split; return the record."""
        assert self.calibration is not None
        batches = self._validation_batches(trainer, pl_module)
        was_training = pl_module.training
        pl_module.eval()
        model = pl_module.model
        encode = getattr(pl_module, "encode_batch", None)
        batches = [encode(b) if callable(encode) else b for b in batches]
        gates: list[torch.Tensor] | None = None
        if "conflict" in self.calibration.gates:
            gates = [conflict_gate(pl_module, b) for b in batches]  # no AR is installed yet
        template = getattr(pl_module, "val_metrics", None)
        bayes = getattr(trainer.datamodule, "bayes_bounds", None)
        labels = len(model.labels)

        def evaluate(entry: Reallocator | None) -> dict[str, float]:
            # The module's own validation metric (it may know the split's Bayes bounds).
            if isinstance(template, EmotionMetrics):
                metrics = template.clone()
            else:
                metrics = EmotionMetrics(num_classes=labels, prefix="val/")
            if callable(bayes):  # the validation split's Bayes bounds give val/excess_gap
                metrics.set_bayes(bayes("val"))
            metrics.reset()
            metrics = metrics.to(pl_module.device)
            if entry is not None:
                self._install(entry, pl_module)
            try:
                for index, batch in enumerate(batches):
                    if entry is not None and entry.gate == "conflict":
                        assert gates is not None
                        entry.set_sample_gate(gates[index])
                    scores = model.score_labels(batch)
                    labelled = batch["labels"] >= 0
                    metrics.update(
                        scores.argmax(1)[labelled],
                        batch["labels"][labelled],
                        batch["subset_ids"][labelled],
                    )
            finally:
                if entry is not None:
                    self._deactivate_entry(entry)
            return {k: float(v) for k, v in metrics.compute().items()}

        try:
            record = self.calibration.run(evaluate)
        finally:
            pl_module.train(was_training)
        if gates is not None:
            flags = torch.cat(gates).float()
            record["val_gate_rate"] = float(flags.mean()) if flags.numel() else 0.0
        record["checkpoint"] = Path(trainer.ckpt_path).name if trainer.ckpt_path else None
        return record

    def _deactivate_entry(self, entry: Reallocator) -> None:
        if self._installed is not None:
            backbone, original = self._installed
            self._installed = None
            restore_attention(backbone, self.name, original)
        entry.unbind()

    def _log_record(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        logger = mlflow_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        chosen = next(e for e in record["entries"] if e["label"] == record["chosen"])
        baseline = record["entries"][0]
        logger.experiment.set_tag(logger.run_id, "ar.calibrated", record["chosen"])
        logger.experiment.log_dict(logger.run_id, record, CALIBRATION_ARTIFACT)
        logger.log_metrics(
            {
                "calibration/val_acc": chosen["val_acc"],
                "calibration/val_objective": chosen["objective"],
                "calibration/baseline_val_acc": baseline["val_acc"],
                "calibration/baseline_val_objective": baseline["objective"],
            },
            step=trainer.global_step,
        )

    # ---------------------------------------------------------------- reporting

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self._reduce_and_summarise(trainer, pl_module, "test")
        for name, value in metrics.items():
            # Values are already reduced over processes, hence identical on every rank.
            pl_module.log(name, value, sync_dist=True)
        self._log_artifacts(trainer, "test")

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = self._reduce_and_summarise(trainer, pl_module, "predict")
        if trainer.is_global_zero and metrics:
            for logger in trainer.loggers:  # self.log is not available while predicting
                logger.log_metrics(metrics, step=trainer.global_step)
        self._log_artifacts(trainer, "predict")

    def _reduce_and_summarise(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str
    ) -> dict[str, float]:
        gate = self._gate_counts.to(pl_module.device)
        if trainer.world_size > 1:
            gate = trainer.strategy.reduce(gate, reduce_op="sum")
        gate_metrics = {}
        if self.reallocator.gate == "conflict" and float(gate[1]) > 0:
            gate_metrics[f"{stage}/ar/gate_rate"] = float(gate[0] / gate[1])
        monitor = self.reallocator.monitor
        if monitor is None:
            return gate_metrics
        state = monitor.state(pl_module.device).clone()
        if trainer.world_size > 1:
            state = trainer.strategy.reduce(state, reduce_op="sum")
        monitor.load_state(state.cpu())
        summary = monitor.summary()
        metrics: dict[str, float] = dict(gate_metrics)
        for modality, value in summary["after"].items():
            metrics[f"{stage}/attn_share/{modality}"] = value
        for modality, value in summary["before"].items():
            metrics[f"{stage}/attn_share_before/{modality}"] = value
        over = self.reallocator.over_relied
        before, after = summary["before"].get(over), summary["after"].get(over)
        if before is not None and after is not None and before == before:
            raised = after > before + 1e-6
            metrics[f"{stage}/ar/raised_over_relied"] = float(raised)
            if raised:
                rank_zero_warn(
                    f"AR {self.reallocator.label()} raised the attention share of {over}, the "
                    f"modality the model is taken to over-rely on ({before:.4f} -> {after:.4f})"
                )
        return metrics

    def _log_artifacts(self, trainer: pl.Trainer, stage: str) -> None:
        monitor = self.reallocator.monitor
        if monitor is None or not self.plot or not trainer.is_global_zero:
            return
        figure_file = FIGURE_FILES[stage]
        fig = monitor.figure(
            title=f"{stage}: attention share per layer ({self.reallocator.label()})"
        )
        log_figure(trainer, fig, figure_file)
        log_dict(trainer, self.share_table(), figure_file.replace(".png", ".json"))

    def share_table(self) -> dict[str, Any]:
        """Per-layer shares as plain lists (the JSON artifact beside the plot)."""
        monitor = self.reallocator.monitor
        if monitor is None:
            return {}
        before, after = monitor.per_layer()

        def rows(shares: torch.Tensor) -> list[list[float | None]]:
            # Layers without monitored rows are NaN; JSON gets null instead.
            return [[None if v != v else v for v in row] for row in shares.tolist()]

        return {
            "mode": self.reallocator.name,
            "reallocator": self.reallocator.describe(),
            "modalities": [m.name.lower() for m in MONITORED],
            "count": monitor.count.tolist(),
            "before": rows(before),
            "after": rows(after),
        }
