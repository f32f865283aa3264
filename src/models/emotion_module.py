"""The LightningModule: a frozen LLM with projectors and an adapter, trained and evaluated."""

from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from torch.optim.lr_scheduler import LambdaLR

from src.core.errors import InvalidInputError
from src.core.records import SUBSETS
from src.core.streams import StreamSpec
from src.data.components.tokenizer import load_tokenizer
from src.io.checkpoint_io import RUN_ID_KEY, CheckpointMismatchError
from src.metrics.closed_set import DEFAULT_BOOTSTRAP_RESAMPLES, EmotionMetrics
from src.metrics.modality_following import ModalityFollowing
from src.models.adapters.base import Adapter, NoAdapter
from src.models.backbones.base import EmotionBackbone
from src.models.multimodal_llm import MultimodalEmotionLLM
from src.models.online_features import encode_media
from src.models.step_faults import locate_out_of_memory, step_location
from src.tracking.artifacts import log_figure, log_rows, mlflow_logger


class EmotionLLMModule(L.LightningModule):
    """Emotion MLLM: a backbone (features into a frozen LM) with an adapter -> label scores.

    Args:
        backbone: The backbone component (``conf/model/``), e.g.
            :class:`~src.models.backbones.projected_causal_lm.ProjectedCausalLM`: projectors in
            front of any local Hugging Face causal LM. Built here once the tokenizer and the
            streams are known; its frozen weights are never saved in checkpoints.
        adapter: The trainable adapter (plain LoRA, MoSE, or none).
        length_normalize: Score labels by mean instead of summed token log-likelihood
            (``None``: when the label answers differ in length, i.e. real tokenizers).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear learning-rate warm-up steps.
        max_new_tokens: Generation length limit in predict when ``generate`` is on.
        generate: Also generate reasoning text in ``predict``.
        tokenizer: Tokenizer directory (linked from the data module).
        labels: Label words in class order (linked from the data module).
        streams: Feature streams (linked from the data module).
        encoders: Online encoders per stream name (frozen LightningModules such as
            :class:`~src.models.encoders.AudioEncoder`); they compute the features of batches
            that carry raw media (data ``source: media``) instead of stored features.
    """

    def __init__(
        self,
        backbone: EmotionBackbone | None = None,
        adapter: Adapter | None = None,
        length_normalize: bool | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_new_tokens: int = 64,
        generate: bool = False,
        tokenizer: str | None = None,
        labels: list[str] | None = None,
        streams: list[StreamSpec] | None = None,
        encoders: dict[str, L.LightningModule] | None = None,
    ) -> None:
        super().__init__()
        if backbone is None:
            raise ValueError(
                "model.backbone is required: a class_path such as "
                "src.models.backbones.projected_causal_lm.ProjectedCausalLM (conf/model/)"
            )
        if tokenizer is None or labels is None or streams is None:
            raise ValueError(
                "tokenizer, labels and streams come from the data module (the CLI links them); "
                "pass them explicitly when building the module in Python"
            )
        # Plain types only: checkpoints are loaded with weights_only=True.
        self.save_hyperparameters(ignore=["backbone", "adapter", "streams", "encoders"])
        self.hparams["streams"] = [asdict(s) for s in streams]
        # The backbone as data: its class named by a string, its plain settings (never built
        # from the file; the CLI merges them only into the same, configured class).
        self.hparams["backbone"] = {
            "class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
            "settings": backbone.settings(),
        }
        tok = load_tokenizer(tokenizer)
        self.model = MultimodalEmotionLLM(backbone, tok, streams, labels, length_normalize)
        self.adapter = adapter or NoAdapter()
        self.adapter.apply(self.model)
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.max_new_tokens, self.generate_text = max_new_tokens, generate
        self.val_metrics = EmotionMetrics(num_classes=len(labels), prefix="val/")
        # Test adds bootstrap 95% intervals for subset accuracies and the gap.
        self.test_metrics = EmotionMetrics(
            num_classes=len(labels), prefix="test/", bootstrap_resamples=DEFAULT_BOOTSTRAP_RESAMPLES
        )
        # On conflict test samples: did the prediction follow the audio or the visual label?
        self.test_following = ModalityFollowing(SUBSETS, prefix="test/")
        # Checkpoints hold trainable weights only; the frozen backbone is rebuilt from config.
        self.strict_loading = False
        # Frozen encoders are rebuilt from config too (checkpoints keep trainable weights only).
        self.encoders = torch.nn.ModuleDict(encoders or {})

    def encode_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Fill ``features`` from raw media with the online encoders (no-op for stored ones).

        Called inside the steps, so encoders run under the trainer's precision (autocast).
        """
        return encode_media(self.encoders, self.model.streams, batch)

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # Out of memory here or in `backward` is re-raised naming the step and the batch.
        self._step_where = step_location(self.global_step, batch_idx, batch["names"])
        with locate_out_of_memory(self._step_where, "forward"):
            return self._training_step(batch, batch_idx)

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        with locate_out_of_memory(getattr(self, "_step_where", "an unknown step"), "backward"):
            super().backward(loss, *args, **kwargs)

    def _training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        batch = self.encode_batch(batch)
        self.adapter.on_train_batch_start(self.model, batch, self.global_step)
        batch = self.adapter.prepare_train_batch(self.model, batch, self.global_step)
        lm_loss = self.model.lm_loss(batch)
        loss = lm_loss
        aux = self.adapter.auxiliary_loss()
        if aux is not None:
            loss = loss + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at global step {self.global_step}, "
                f"batch {batch_idx} "
                f"(samples {batch['names'][:4]}...); the last good checkpoint is kept"
            )
        size = len(batch["names"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/lm_loss", lm_loss, batch_size=size)
        for key, value in self.adapter.step_metrics().items():
            self.log(f"train/{key}", value, batch_size=size)
        for modality, scale in (self.adapter.lr_scales() or {}).items():
            self.log(f"train/lr_scale/{modality}", scale, batch_size=size)
        return loss

    # --------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict[str, Any], metrics: EmotionMetrics) -> torch.Tensor:
        batch = self.encode_batch(batch)
        scores = self.model.score_labels(batch)
        labelled = batch["labels"] >= 0
        if labelled.any():
            metrics.update(
                scores.argmax(dim=1)[labelled],
                batch["labels"][labelled],
                batch["subset_ids"][labelled],
            )
        return scores

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute())
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scores = self._evaluate(batch, self.test_metrics)
        if "audio_labels" in batch:
            self.test_following.update(
                scores.argmax(dim=1),
                batch["audio_labels"],
                batch["video_labels"],
                batch["subset_ids"],
            )

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        following = self.test_following.compute() if self.test_following.update_called else {}
        if following:
            self.log_dict(following)
        if self.trainer.is_global_zero:
            for name, figure in self.test_metrics.figures(self.model.labels).items():
                log_figure(self.trainer, figure, f"confusion/{name}")
            figure = self.test_following.figure() if following else None
            if figure is not None:
                log_figure(self.trainer, figure, "modality_following.png")
        self.test_metrics.reset()
        self.test_following.reset()

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        batch = self.encode_batch(batch)
        scores = self.model.score_labels(batch)
        texts = self.model.generate(batch, self.max_new_tokens) if self.generate_text else None
        return {
            "names": batch["names"],
            "subsets": batch["subsets"],
            "labels": batch["labels"],
            "scores": scores,
            "texts": texts,
            # Encoded once here; writers reuse them (e.g. ClipReportWriter's unimodal passes).
            "features": batch["features"],
        }

    # ----------------------------------------------------------------------------- hooks
    def setup(self, stage: str) -> None:
        # A backbone fine-tuned on one prompt format (Emotion-LLaMA's [INST]) is refused with
        # another before anything runs: its scores would be silently worse.
        wanted = self.model.backbone.prompt_format
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        given = getattr(data, "prompt_format", None)
        if wanted != "auto" and given is not None and given != wanted:
            raise InvalidInputError(
                f"model.backbone.prompt_format is {wanted!r} (the format the backbone was "
                f"trained with) but data.prompt_format is {given!r}: set "
                f"--data.init_args.prompt_format {wanted}"
            )

    def on_fit_start(self) -> None:
        self._log_skipped()

    def on_test_start(self) -> None:
        self._log_skipped()
        self._set_bayes(self.test_metrics, "test")

    def on_validation_start(self) -> None:
        self._set_bayes(self.val_metrics, "val")

    def _set_bayes(self, metrics: EmotionMetrics, split: str) -> None:
        """Bayes bounds of the split from the data module (synthetic worlds), else none."""
        datamodule = getattr(self.trainer, "datamodule", None)
        bounds = getattr(datamodule, "bayes_bounds", None)
        # The sanity check sees a few batches only: bounds of the whole split do not apply.
        usable = callable(bounds) and not self.trainer.sanity_checking
        metrics.set_bayes(bounds(split) if usable else None)

    def _log_skipped(self) -> None:
        data = self.trainer.datamodule
        skipped = getattr(data, "skipped", None)
        if skipped:
            log_rows(self.trainer, list(skipped), "skipped_samples.csv")
        unknown = getattr(data, "unknown_subtitle_words", None)
        if unknown:
            rows = [{"word": word, "count": count} for word, count in unknown.items()]
            log_rows(self.trainer, rows, "unknown_subtitle_words.csv")

    def on_fit_end(self) -> None:
        for name, figure in self.adapter.figures().items():
            log_figure(self.trainer, figure, name)

    def _checkpoint_keys(self) -> set[str]:
        """What a checkpoint holds: trainable parameters and the adapter modules' own buffers
        (e.g. MoSE's dominance-driven modality weights), never the frozen backbone."""
        keys = {n for n, p in self.named_parameters() if p.requires_grad}
        adapter_modules = {id(m) for m in self.adapter.trainable_modules(self.model)}
        owners = {name for name, module in self.named_modules() if id(module) in adapter_modules}
        # Only persistent buffers are in a state dict; those of adapter modules are kept.
        buffers = {n for n, _ in self.named_buffers()}
        keys |= {k for k in self.state_dict() if k in buffers and k.rsplit(".", 1)[0] in owners}
        return keys

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        # The MLflow run of this training: `fit --ckpt_path` resumes logging into it.
        logger = mlflow_logger(self.trainer)
        if logger is not None and logger.run_id is not None:
            checkpoint[RUN_ID_KEY] = logger.run_id

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self._checkpoint_keys() - set(checkpoint["state_dict"]))
        if missing:
            raise CheckpointMismatchError(
                f"checkpoint lacks {len(missing)} trainable weight(s) of this model, e.g. "
                f"{missing[:3]}: was it saved with another adapter or projector setting?"
            )

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: one per modality (the backbone's parameters of it, e.g. its
        projectors, and the adapter's parameters of
        that modality, e.g. MoSE's experts) and one ``shared`` group for the rest, so an
        adapter's :meth:`~src.models.adapters.base.Adapter.lr_scales` can modulate each
        modality's update."""
        by_modality = self.adapter.modality_parameters(self.model)
        for modality, params in self.model.backbone.modality_parameters().items():
            by_modality.setdefault(modality, []).extend(params)
        groups, seen = [], set()
        for modality, params in by_modality.items():
            params = [p for p in params if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "name": modality, "modality": modality})
        shared = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        if shared:
            groups.append({"params": shared, "name": "shared", "modality": None})
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.param_groups(), lr=self.lr, weight_decay=self.weight_decay
        )
        if self.warmup_steps <= 0:
            return optimizer
        warmup = self.warmup_steps
        scheduler = LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """The optimizer step with each modality group's learning rate times the adapter's
        factor for this step (read after the closure ran the training step, restored after,
        so schedulers and the LR monitor see the unscaled rates)."""
        saved: list[tuple[dict[str, Any], float]] = []

        def closure() -> Any:
            loss = optimizer_closure() if optimizer_closure is not None else None
            scales = self.adapter.lr_scales() or {}
            for group in optimizer.param_groups:
                scale = scales.get(group.get("modality"))
                if scale is not None:
                    saved.append((group, group["lr"]))
                    group["lr"] = group["lr"] * float(scale)
            return loss

        try:
            optimizer.step(closure=closure)
        finally:
            for group, lr in saved:
                group["lr"] = lr
