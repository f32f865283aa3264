"""MoSE as an :class:`Adapter`: modality-specific experts, gating loss, dynamic modality weights.

Configured as a method's adapter (``conf/method/mose.yaml`` -> ``conf/adapter/mose.yaml``); the
emotion LightningModule calls :meth:`apply` once, :meth:`on_train_batch_start` before each
training forward, adds :meth:`auxiliary_loss` to the task loss, logs :meth:`step_metrics` as
``train/<key>`` and :meth:`figures` as MLflow artifacts. Equations: ``docs/mose.md``.
"""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from matplotlib.figure import Figure
from safetensors.torch import save_file
from torch import nn

from src.core.modality import Modality
from src.models.adapters.base import Adapter
from src.models.adapters.targets import check_target_modules, resolve_targets
from src.models.modality_context import ModalityContext
from src.models.modality_weights import (
    DominanceModalityWeights,
    ModalityWeights,
    build_modality_weights,
)
from src.models.mose import (
    MoSELinear,
    inject_mose,
    load_mose_state_dict,
    mose_layers,
    mose_state_dict,
)
from src.models.mose_regularizer import LayerRecord, MoSEGateLoss, stack_group

if TYPE_CHECKING:  # pragma: no cover
    from src.models.multimodal_llm import MultimodalEmotionLLM

__all__ = ["MoSEAdapter", "mose_state_dict", "load_mose_state_dict"]

_LOGGED_MODALITIES = ("audio", "visual")
#: The MoSE export layout (``python -m src.cli export``), versioned.
MOSE_EXPORT_FORMAT = "mosear-mose/1"
MOSE_WEIGHTS_FILE = "mose_adapter.safetensors"
MOSE_CONFIG_FILE = "mose_config.json"


class MoSEAdapter(Adapter):
    """Modality-specific LoRA experts with a shared ``A`` in the frozen backbone.

    Args:
        rank: Rank ``r`` of the shared ``A`` and of each expert ``B`` (Emotion-LLaMA's LoRA: 64).
        alpha: LoRA ``alpha``; adapter outputs are scaled by ``alpha / rank`` (Emotion-LLaMA: 16).
        dropout: Dropout on the adapted layer's input before ``A``.
        n_audio_experts: Experts for audio tokens.
        n_visual_experts: Experts for visual tokens.
        n_text_experts: Experts for text tokens when ``text_mode="experts"``.
        text_mode: Text tokens get their own gated experts (``"experts"``), one plain LoRA ``B``
            sharing ``A`` (``"lora"``), or no update (``"none"``).
        top_k: ``None``: dense softmax gate; else mix each token's ``top_k`` most probable
            experts, renormalised.
        gate_input: The gate reads the token's hidden input (``"hidden"``) or ``A x``
            (``"shared_a"``).
        target_modules: Names of the linear layers to adapt (last path component); ``None``:
            the backbone family's default (peft's mapping, as :class:`LoRAAdapter`);
            ``all-linear``: every linear layer but the head. Fused projections (Phi-3
            ``qkv_proj``, GPT-NeoX/Falcon ``query_key_value``, GPT-2's ``Conv1D`` ``c_attn``)
            are adapted whole, as peft's LoRA adapts them.
        layers: Transformer layer indices to adapt; ``None`` = all.
        balance_loss: Within-modality balancing: ``"cv2"`` (LoRAMoE / Shazeer) or ``"switch"``.
        balance_weight: Weight of the within-modality balancing term in the gating loss.
        modality_balance_weight: Weight of the cross-modality contribution balance term.
        modality_weighting: Dynamic modality weights: ``"none"`` (fixed), ``"learned"`` or
            ``"dominance"`` (OGM-GE-style, from unimodal gold-label confidence).
        fixed_weights: ``(audio, visual)`` weights of the ``"none"`` strategy.
        learned_normalize: ``"learned"``: keep ``w_audio + w_visual = 2`` (softmax) instead of
            two independent softplus weights.
        dominance_alpha: ``"dominance"``: modulation strength ``alpha`` of ``1 - tanh(alpha (rho
            - 1))``.
        dominance_momentum: ``"dominance"``: EMA factor of the weights.
        dominance_interval: ``"dominance"``: measure every this many training steps.
        dominance_min_weight: ``"dominance"``: floor of the dominant modality's weight.
        dominance_signal: ``"dominance"``: what is compared: ``confidence`` (gold-label
            probability), ``loglik`` (gold log-likelihood over chance) or ``accuracy``
            (unimodal batch accuracy over chance); see :mod:`src.models.modality_weights`.
        weight_outputs: Scale each modality's expert outputs by its weight in the forward
            (MoSE's dynamic modality weights as in the paper).
        modulate_lr: Also scale the learning rate of each modality's experts and projectors by
            its weight (the update itself, which survives AdamW; a gradient scale does not).
        compile: Fuse each layer's adapter math with ``torch.compile`` (for GPUs, where its
            small kernels are launch-bound; the first steps pay the compilation).
        unimodal_loss_weight: Weight of a unimodal training loss: the answer's LM loss with
            audio masked out of attention and with the visual tokens masked out, averaged and
            added to the training loss, so each modality's reading keeps being trained when the
            joint model could rely on one (0: off; it costs two more passes per step).
    """

    def __init__(
        self,
        rank: int = 64,
        alpha: float = 16.0,
        dropout: float = 0.05,
        n_audio_experts: int = 4,
        n_visual_experts: int = 4,
        n_text_experts: int = 4,
        text_mode: Literal["experts", "lora", "none"] = "lora",
        top_k: int | None = None,
        gate_input: Literal["hidden", "shared_a"] = "hidden",
        target_modules: list[str] | str | None = None,
        layers: list[int] | None = None,
        balance_loss: Literal["cv2", "switch"] = "cv2",
        balance_weight: float = 0.01,
        modality_balance_weight: float = 0.01,
        modality_weighting: Literal["none", "learned", "dominance"] = "none",
        fixed_weights: tuple[float, float] = (1.0, 1.0),
        learned_normalize: bool = True,
        dominance_alpha: float = 0.5,
        dominance_momentum: float = 0.9,
        dominance_interval: int = 1,
        dominance_min_weight: float = 0.1,
        dominance_signal: Literal["confidence", "loglik", "accuracy"] = "confidence",
        weight_outputs: bool = True,
        modulate_lr: bool = False,
        compile: bool = False,
        unimodal_loss_weight: float = 0.0,
    ) -> None:
        if unimodal_loss_weight < 0:
            raise ValueError(f"unimodal_loss_weight must be >= 0, got {unimodal_loss_weight}")
        self.unimodal_loss_weight = unimodal_loss_weight
        self._unimodal_loss: torch.Tensor | None = None
        #: The last unimodal losses (detached); copied to the host with the gating metrics.
        self._unimodal_parts: dict[str, torch.Tensor] = {}
        self.layer_kwargs: dict[str, Any] = {
            "rank": rank,
            "alpha": alpha,
            "dropout": dropout,
            "n_audio_experts": n_audio_experts,
            "n_visual_experts": n_visual_experts,
            "n_text_experts": n_text_experts,
            "text_mode": text_mode,
            "top_k": top_k,
            "gate_input": gate_input,
            # The cross-modality term needs contributions attached to the graph; else log only.
            "track_contribution": modality_balance_weight > 0,
            "record_dispatch": balance_loss == "switch",
            "compile": compile,
        }
        # Fail at config time, not after the backbone is loaded: build one throw-away layer.
        MoSELinear(nn.Linear(2, 2), ModalityContext(), **self.layer_kwargs)
        check_target_modules(target_modules)
        self.target_modules = (
            target_modules if isinstance(target_modules, str | None) else tuple(target_modules)
        )
        #: The names adapted, resolved against the backbone by :meth:`apply`.
        self.resolved_targets: list[str] = []
        self.layers = None if layers is None else list(layers)
        self.gate_loss = MoSEGateLoss(balance_loss, balance_weight, modality_balance_weight)
        self.weighting = modality_weighting
        strategy_kwargs: dict[str, dict[str, Any]] = {
            "none": {"audio": fixed_weights[0], "visual": fixed_weights[1]},
            "learned": {"normalize": learned_normalize},
            "dominance": {
                "alpha": dominance_alpha,
                "momentum": dominance_momentum,
                "interval": dominance_interval,
                "min_weight": dominance_min_weight,
                "signal": dominance_signal,
            },
        }
        if modality_weighting not in strategy_kwargs:
            raise ValueError(
                f"modality_weighting: unknown {modality_weighting!r}; "
                f"expected one of {sorted(strategy_kwargs)}"
            )
        self.weights: ModalityWeights = build_modality_weights(
            modality_weighting, **strategy_kwargs[modality_weighting]
        )
        self.weight_outputs = weight_outputs
        self.modulate_lr = modulate_lr
        if not weight_outputs and not modulate_lr and modality_weighting != "none":
            raise ValueError(
                f"modality_weighting {modality_weighting!r} acts through weight_outputs or "
                "modulate_lr; both are off"
            )
        #: ``(step, w_audio, w_visual)`` after every update: the trajectory plot.
        self.history: list[tuple[int, float, float]] = []
        self.mose_layers: list[MoSELinear] = []
        self.layer_names: list[str] = []
        self._pending_loss: torch.Tensor | None = None
        self._metrics: dict[str, float] = {}
        self._usage: dict[str, list[torch.Tensor]] = {}
        self._usage_count: dict[str, list[float]] = {}

    # --- Adapter contract --------------------------------------------------------------------

    def apply(self, llm: "MultimodalEmotionLLM") -> None:
        if self.mose_layers:
            raise RuntimeError("MoSEAdapter.apply was already called; build a new adapter")
        self.resolved_targets = resolve_targets(llm.language_model, self.target_modules)
        self.mose_layers = inject_mose(
            llm.language_model,
            llm.modality_context,
            target_modules=self.resolved_targets,
            layers=self.layers,
            # Without weight_outputs the forward keeps weight 1; the weights drive the LR only.
            modality_weights=self.weights if self.weight_outputs else None,
            **self.layer_kwargs,
        )
        by_id = {id(m): n for n, m in mose_layers(llm.language_model)}
        self.layer_names = [by_id[id(m)] for m in self.mose_layers]
        self.reset_usage()

    def trainable_modules(self, llm: "MultimodalEmotionLLM") -> list[nn.Module]:
        return [*self.mose_layers, self.weights]

    def on_train_batch_start(
        self, llm: "MultimodalEmotionLLM", batch: dict[str, Any], step: int
    ) -> None:
        # Records of forwards outside a training step (nobody consumed them) must not leak in.
        for layer in self.mose_layers:
            layer.clear_records()
        self._pending_loss = None
        self.weights.update(llm, batch, step)
        w = self.weights.as_dict()
        self.history.append((step, w["audio"], w["visual"]))
        self._unimodal_loss = None
        if self.unimodal_loss_weight > 0:
            visual_only = llm.lm_loss(batch, drop_modalities=(Modality.AUDIO,))
            audio_only = llm.lm_loss(batch, drop_modalities=(Modality.VISUAL,))
            # The gating loss balances the experts on the joint forward only.
            for layer in self.mose_layers:
                layer.clear_records()
            self._unimodal_loss = self.unimodal_loss_weight * (visual_only + audio_only) / 2
            self._unimodal_parts = {
                "unimodal_loss/visual_only": visual_only.detach(),
                "unimodal_loss/audio_only": audio_only.detach(),
            }

    def auxiliary_loss(self) -> torch.Tensor | None:
        self._consume()
        loss, self._pending_loss = self._pending_loss, None
        unimodal, self._unimodal_loss = self._unimodal_loss, None
        if unimodal is not None:
            loss = unimodal if loss is None else loss + unimodal
        return loss

    def step_metrics(self) -> dict[str, float]:
        self._consume()
        metrics = dict(self._metrics)
        for name, value in self.weights.as_dict().items():
            metrics[f"modality_weight/{name}"] = value
        if isinstance(self.weights, DominanceModalityWeights) and self.weights.last_measurement:
            s_audio, s_visual, rho = self.weights.last_measurement
            metrics["dominance/audio_confidence"] = s_audio
            metrics["dominance/visual_confidence"] = s_visual
            metrics["dominance/ratio"] = rho
        return metrics

    def modality_weights(self) -> dict[str, float] | None:
        return self.weights.as_dict()

    def modality_parameters(self, llm: "MultimodalEmotionLLM") -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {m: [] for m in _LOGGED_MODALITIES}
        for layer in self.mose_layers:
            for name in _LOGGED_MODALITIES:
                if name in layer.experts:
                    groups[name].append(layer.experts[name])
                if name in layer.gates:
                    groups[name].extend(layer.gates[name].parameters())
        return groups

    def lr_scales(self) -> dict[str, float] | None:
        return self.weights.as_dict() if self.modulate_lr else None

    def export(self, llm: "MultimodalEmotionLLM", folder: Path) -> list[Path]:
        """``mose_adapter.safetensors`` (:func:`mose_state_dict` of the backbone: shared ``A``,
        expert ``B``'s, gates, modality weights; keys relative to the backbone) and
        ``mose_config.json`` (format tag, layer settings, adapted layers); see docs/tracking.md.
        """
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in mose_state_dict(llm.language_model).items()}
        weights = folder / MOSE_WEIGHTS_FILE
        save_file(state, str(weights), metadata={"format": MOSE_EXPORT_FORMAT})
        settings = {
            "format": MOSE_EXPORT_FORMAT,
            "layer_kwargs": self.layer_kwargs,
            "target_modules": list(self.resolved_targets),
            "layers": self.layers,
            "layer_names": self.layer_names,
            "modality_weighting": self.weighting,
            "modality_weights": self.weights.as_dict(),
            # Whether the weights scale expert outputs in the forward (else only the LR).
            "weight_outputs": self.weight_outputs,
        }
        config = folder / MOSE_CONFIG_FILE
        config.write_text(json.dumps(settings, indent=2) + "\n")
        return [config, weights]

    def figures(self) -> dict[str, Any]:
        out = {}
        table = self.usage_table()
        if table:
            out["expert_usage.png"] = plot_expert_usage(table, self.layer_names)
        if self.history and self.weighting != "none":
            out["modality_weights.png"] = plot_weight_trajectory(self.history, "MoSE")
        return out

    # --- statistics --------------------------------------------------------------------------

    def reset_usage(self) -> None:
        """Forget the accumulated expert usage (call at epoch start for per-epoch plots)."""
        self._usage = {}
        self._usage_count = {}

    def usage_table(self) -> dict[str, torch.Tensor]:
        """Mean mixing weight per (layer, expert) of each gated modality since the last reset."""
        table = {}
        for group, sums in self._usage.items():
            counts = torch.tensor(self._usage_count[group]).clamp_min(1.0).unsqueeze(1)
            table[group] = sums.float().cpu() / counts
        return table

    def _consume(self) -> None:
        """Turn the layers' records into the pending gating loss, metrics and usage.

        Vectorised over layers, with a single device-to-host copy for all the metrics.
        """
        per_layer = [layer.pop_records() for layer in self.mose_layers]
        records = [r for layer_records in per_layer for r in layer_records]
        if not records:
            return
        out = self.gate_loss(records)
        self._pending_loss = out.loss
        self._accumulate_usage(per_layer)
        metrics = {
            "gate_loss": out.loss.detach().float(),
            "gate_loss/balance": out.balance.float(),
            "gate_loss/modality": out.modality.float(),
            **_layer_statistics(records),
            **{k: v.float() for k, v in self._unimodal_parts.items()},
        }
        device = metrics["gate_loss"].device
        floats = torch.stack([v.to(device) for v in metrics.values()]).cpu().tolist()
        self._metrics = dict(zip(metrics, floats, strict=True))

    def _accumulate_usage(self, per_layer: list[list[LayerRecord]]) -> None:
        records = [r for layer_records in per_layer for r in layer_records]
        layer_index = [i for i, layer_records in enumerate(per_layer) for _ in layer_records]
        n_layers = len(per_layer)
        for index, name in enumerate(records[0].groups):
            start, stop = records[0].columns[index]
            if stop - start < 2:  # no gate, nothing to plot
                continue
            rows = torch.stack([r.usage for r in records])[:, start:stop].float()
            sums = self._usage.get(name)
            if sums is None:
                sums = rows.new_zeros(n_layers, stop - start)
                self._usage_count[name] = [0.0] * n_layers
            if layer_index == list(range(n_layers)):  # one forward per layer: no index tensor
                sums = sums + rows
            else:
                sums = sums.index_add(0, torch.tensor(layer_index, device=rows.device), rows)
            self._usage[name] = sums
            for i, r in zip(layer_index, records, strict=True):
                self._usage_count[name][i] += r.counts[index]


def _layer_statistics(records: list[LayerRecord]) -> dict[str, torch.Tensor]:
    """Mean over layers of each modality's expert usage entropy (nats) and contribution.

    A modality without tokens in this step has no entry (rather than a made-up value).
    """
    stats = {}
    for group in _LOGGED_MODALITIES:
        usage = stack_group(records, group, "usage")
        if usage is None:
            continue
        # Mixing weights sum to one per token, so a row's sum is its token count.
        p = usage.float() / usage.float().sum(-1, keepdim=True)
        stats[f"expert_entropy/{group}"] = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
        present = [r for r in records if r.counts[r.groups.index(group)] > 0]
        index = present[0].groups.index(group)
        contribution = torch.stack([r.contribution for r in present])[:, index]
        stats[f"contribution/{group}"] = contribution.detach().float().mean()
    return stats


def plot_expert_usage(table: dict[str, torch.Tensor], layer_names: list[str]) -> Figure:
    """Heat maps of the mean mixing weight per layer (rows) and expert (columns), per modality.

    The colour scale is centred on uniform use (``1/E``, white) and diverges to the largest
    deviation in the figure, so small imbalances are visible; every cell shows its value.
    """
    from matplotlib.colors import TwoSlopeNorm

    groups = list(table)
    n_layers = max(t.shape[0] for t in table.values())
    max_experts = max(t.shape[1] for t in table.values())
    fig = Figure(
        figsize=(0.75 * max_experts * len(groups) + 2.5, 0.4 * n_layers + 1.8),
        layout="constrained",
    )
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    labels = [_short_layer_name(n) for n in layer_names[:n_layers]]
    for ax, group in zip(axes, groups, strict=True):
        usage = table[group].numpy()
        n_experts = usage.shape[1]
        uniform = 1.0 / n_experts
        spread = max(float(abs(usage - uniform).max()), 1e-3)
        norm = TwoSlopeNorm(vcenter=uniform, vmin=max(uniform - spread, 0.0), vmax=uniform + spread)
        image = ax.imshow(usage, aspect="auto", cmap="RdBu_r", norm=norm)
        for (row, col), value in _cells(usage):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{group} (uniform = {uniform:.2f})")
        ax.set_xlabel("expert")
        ax.set_xticks(range(n_experts))
        ax.set_yticks(range(usage.shape[0]))
        ax.set_yticklabels(labels[: usage.shape[0]] if group == groups[0] else [], fontsize=7)
        fig.colorbar(image, ax=ax, label="mean gate weight")
    fig.suptitle("MoSE expert usage per modality (white = uniform)")
    return fig


def plot_weight_trajectory(history: list[tuple[int, float, float]], title: str) -> Figure:
    """Audio and visual weights (or LR factors) against the training step."""
    steps = [h[0] for h in history]
    fig = Figure(figsize=(6.0, 3.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, [h[1] for h in history], color="tab:orange", label="audio")
    ax.plot(steps, [h[2] for h in history], color="tab:blue", label="visual")
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("training step")
    ax.set_ylabel("modality weight")
    ax.set_title(f"{title}: modality weights over training")
    ax.legend()
    return fig


def _cells(values: Any) -> list[tuple[tuple[int, int], float]]:
    rows, cols = values.shape
    return [((r, c), float(values[r, c])) for r in range(rows) for c in range(cols)]


def _short_layer_name(name: str) -> str:
    parts = name.split(".")
    digits = [p for p in parts if p.isdigit()]
    return f"L{digits[0]} {parts[-1]}" if digits else parts[-1]
