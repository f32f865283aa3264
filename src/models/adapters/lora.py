"""Plain LoRA through peft: the baseline adapter (Emotion-LLaMA: r=64, alpha=16 on q/v)."""

from typing import TYPE_CHECKING

from peft import LoraConfig, inject_adapter_in_model

from src.models.adapters.base import Adapter

if TYPE_CHECKING:  # pragma: no cover
    from src.models.multimodal_llm import MultimodalEmotionLLM


class LoRAAdapter(Adapter):
    """peft LoRA injected into the backbone's target linear layers.

    Args:
        r: LoRA rank.
        alpha: LoRA alpha (the update is scaled by ``alpha / r``).
        dropout: Dropout on the LoRA input.
        target_modules: Module names to adapt (``q_proj``, ``v_proj`` as Emotion-LLaMA).
        layers: Layer indices to adapt; ``None`` for all.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        target_modules: list[str] = ["q_proj", "v_proj"],  # noqa: B006 - jsonargparse default
        layers: list[int] | None = None,
    ) -> None:
        self.config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(target_modules),
            layers_to_transform=layers,
            bias="none",
        )

    def apply(self, llm: "MultimodalEmotionLLM") -> None:
        # inject_adapter_in_model keeps the backbone's own class (no PeftModel wrapper), so
        # generate(), set_attn_implementation() and the attention interface work unchanged.
        llm.backbone = inject_adapter_in_model(self.config, llm.backbone)
        for name, param in llm.backbone.named_parameters():
            param.requires_grad_("lora_" in name)
