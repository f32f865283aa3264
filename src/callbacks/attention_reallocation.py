"""AR as a Lightning callback: reallocate attention while testing or predicting, never in fit.

Configured under ``trainer.callbacks`` like any callback::

    - class_path: src.callbacks.attention_reallocation.AttentionReallocation
      init_args: {mode: span_mass, target: proportional, query_rows: text}

On ``on_test_start``/``on_predict_start`` it binds a :class:`Reallocator` to
``pl_module.model.modality_context`` and switches ``pl_module.model.backbone`` (the base model
of a peft wrapper) to it through transformers' ``AttentionInterface``; ``on_*_end`` and
``on_exception`` switch back. At the end of the epoch it logs the attention share per modality
(reduced over processes) and a per-layer plot.

Metrics: ``<stage>/attn_share/<modality>`` is the share after reallocation (the attention the
model actually used), ``<stage>/attn_share_before/<modality>`` the share before; both averaged
over every monitored (sample, head, query row) of every layer.
"""

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from src.models.attention.interface import (
    install_reallocator,
    restore_attention,
    unique_name,
    unwrap_backbone,
)
from src.models.attention.reallocator import Mode, QueryRows, Reallocator, Target
from src.models.attention.spans import MONITORED
from src.tracking.artifacts import log_dict, log_figure

FIGURE_FILES = {"test": "attention_share.png", "predict": "attention_share_predict.png"}


class AttentionReallocation(Callback):
    """Attention reallocation (AR) between the audio and visual spans at test/predict time.

    Args:
        mode: ``reweight`` (fixed post-softmax multipliers as a log-bias in SDPA), ``span_mass``
            (move each row's audio/visual mass toward a target share, exactly, in SDPA) or
            ``logit_scale`` (PAI's ``s + alpha |s|`` on one modality's logits, eager; the peer
            baseline).
        multipliers: ``reweight``: modality (``audio``, ``visual``, ``text``) -> multiplier > 0.
        target: ``span_mass``: ``fixed`` (``audio_share``), ``proportional`` (to the visible
            audio and visual token counts of each row) or ``from_adapter`` (MoSE's
            ``pl_module.adapter.modality_weights()``: ``w_a / (w_a + w_v)``).
        audio_share: ``span_mass`` + ``fixed``: target audio share of the audio+visual mass.
        strength: ``span_mass``: fraction of the way to the target, in ``[0, 1]``.
        scale_modality: ``logit_scale``: whose logits to amplify.
        alpha: ``logit_scale``: PAI's amplification.
        layers: decoder layers to act on (negative from the end); ``None`` = all.
        heads: query heads to act on; ``None`` = all.
        query_rows: ``last`` (the generating row), ``text`` (all text rows) or ``all``.
        monitor: measure and log the per-layer attention share of each modality.
        plot: log the per-layer plot (MLflow artifact, else a PNG in ``default_root_dir``).
    """

    def __init__(
        self,
        mode: Mode = "span_mass",
        multipliers: dict[str, float] | None = None,
        target: Target = "proportional",
        audio_share: float = 0.5,
        strength: float = 1.0,
        scale_modality: str = "visual",
        alpha: float = 0.5,
        layers: list[int] | None = None,
        heads: list[int] | None = None,
        query_rows: QueryRows = "text",
        monitor: bool = True,
        plot: bool = True,
    ) -> None:
        super().__init__()
        self.reallocator = Reallocator(
            mode=mode,
            multipliers=multipliers,
            target=target,
            audio_share=audio_share,
            strength=strength,
            scale_modality=scale_modality,
            alpha=alpha,
            layers=layers,
            heads=heads,
            query_rows=query_rows,
            monitor=monitor,
        )
        self.plot = plot
        self.name = unique_name()
        self._installed: tuple[torch.nn.Module, str] | None = None

    @property
    def active(self) -> bool:
        """Whether the backbone currently runs the reallocating attention."""
        return self._installed is not None

    # ------------------------------------------------------------- activation

    def _activate(self, pl_module: pl.LightningModule) -> None:
        self._deactivate()  # a previous run that died without on_exception
        model = getattr(pl_module, "model", None)
        for attribute in ("backbone", "modality_context"):
            if not hasattr(model, attribute):
                raise AttributeError(
                    f"AttentionReallocation needs pl_module.model.{attribute}; "
                    f"{type(pl_module).__name__}.model has none"
                )
        backbone = model.backbone
        base = unwrap_backbone(backbone)
        weights = None
        if self.reallocator.mode == "span_mass" and self.reallocator.target == "from_adapter":
            adapter = getattr(pl_module, "adapter", None)
            weights = adapter.modality_weights() if adapter is not None else None
        self.reallocator.bind(model.modality_context, base.config.num_hidden_layers, weights)
        original = install_reallocator(backbone, self.reallocator, self.name)
        self._installed = (backbone, original)

    def _deactivate(self) -> None:
        if self._installed is not None:
            backbone, original = self._installed
            self._installed = None
            restore_attention(backbone, self.name, original)
            self.reallocator.unbind()  # drop the reference to the module's context

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activate(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._activate(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deactivate()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deactivate()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._deactivate()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # AR is inference-only: make sure nothing is left switched on when training begins.
        self._deactivate()

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
        monitor = self.reallocator.monitor
        if monitor is None:
            return {}
        state = monitor.state(pl_module.device).clone()
        if trainer.world_size > 1:
            state = trainer.strategy.reduce(state, reduce_op="sum")
        monitor.load_state(state.cpu())
        summary = monitor.summary()
        metrics: dict[str, float] = {}
        for modality, value in summary["after"].items():
            metrics[f"{stage}/attn_share/{modality}"] = value
        for modality, value in summary["before"].items():
            metrics[f"{stage}/attn_share_before/{modality}"] = value
        return metrics

    def _log_artifacts(self, trainer: pl.Trainer, stage: str) -> None:
        monitor = self.reallocator.monitor
        if monitor is None or not self.plot or not trainer.is_global_zero:
            return
        figure_file = FIGURE_FILES[stage]
        fig = monitor.figure(title=f"{stage}: attention share per layer ({self.reallocator.mode})")
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
            "mode": self.reallocator.mode,
            "modalities": [m.name.lower() for m in MONITORED],
            "count": monitor.count.tolist(),
            "before": rows(before),
            "after": rows(after),
        }
