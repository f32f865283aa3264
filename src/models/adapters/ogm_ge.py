"""OGM-GE-style modulation on plain LoRA: a baseline against audio over-reliance.

OGM-GE (Peng et al., CVPR 2022) measures each modality's confidence on the gold label, and
slows the dominant modality's encoder by ``k = 1 - tanh(alpha (rho - 1))`` (``rho`` its
confidence ratio over the other modality; the weaker one keeps 1), plus Gaussian noise for
generalisation. Here the modality-specific parameters are the projectors (plain LoRA is shared
by all tokens), and the coefficient scales their **learning rate**: OGM-GE scales gradients,
which AdamW's update is invariant to. The generalisation-enhancement noise is not implemented.
"""

from typing import TYPE_CHECKING, Any, Literal

from matplotlib.figure import Figure

from src.models.adapters.lora import LoRAAdapter
from src.models.adapters.mose_adapter import plot_weight_trajectory
from src.models.modality_weights import DominanceModalityWeights

if TYPE_CHECKING:  # pragma: no cover
    from src.models.multimodal_llm import MultimodalEmotionLLM


class OGMGELoRAAdapter(LoRAAdapter):
    """peft LoRA with OGM-GE learning-rate modulation of the audio and visual projectors (MLflow
    ``method`` tag ``LoRA+OGM-GE``; exports as a peft adapter folder like :class:`LoRAAdapter`:
    the modulation acts in training only).

    Args:
        ogm_alpha: OGM-GE's ``alpha`` (``alpha`` is LoRA's).
        signal: Dominance measure (``confidence`` as OGM-GE, ``loglik`` or ``accuracy``; see
            :class:`~src.models.modality_weights.DominanceModalityWeights`).
        interval: Measure every this many training steps (two extra no-grad scoring passes).
        momentum: EMA of the coefficients (OGM-GE: 0, each step's own).
        min_coefficient: Floor of the dominant modality's coefficient.
        **kwargs: :class:`~src.models.adapters.lora.LoRAAdapter` arguments.
    """

    def __init__(
        self,
        ogm_alpha: float = 0.5,
        signal: Literal["confidence", "loglik", "accuracy"] = "confidence",
        interval: int = 1,
        momentum: float = 0.0,
        min_coefficient: float = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.coefficients = DominanceModalityWeights(
            alpha=ogm_alpha,
            momentum=momentum,
            interval=interval,
            min_weight=min_coefficient,
            signal=signal,
            conserve_sum=False,
        )
        self.history: list[tuple[int, float, float]] = []

    def on_train_batch_start(
        self, llm: "MultimodalEmotionLLM", batch: dict[str, Any], step: int
    ) -> None:
        self.coefficients.update(llm, batch, step)
        w = self.coefficients.as_dict()
        self.history.append((step, w["audio"], w["visual"]))

    def lr_scales(self) -> dict[str, float] | None:
        return self.coefficients.as_dict()

    def step_metrics(self) -> dict[str, float]:
        metrics = {f"ogm/coefficient/{k}": v for k, v in self.coefficients.as_dict().items()}
        if self.coefficients.last_measurement:
            s_audio, s_visual, rho = self.coefficients.last_measurement
            metrics.update(
                {"ogm/audio_signal": s_audio, "ogm/visual_signal": s_visual, "ogm/ratio": rho}
            )
        return metrics

    def figures(self) -> dict[str, Figure]:
        if not self.history:
            return {}
        return {"modality_weights.png": plot_weight_trajectory(self.history, "OGM-GE")}
