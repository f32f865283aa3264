"""Plain LoRA through peft: the baseline adapter (Emotion-LLaMA: r=64, alpha=16 on q/v)."""

from pathlib import Path
from typing import TYPE_CHECKING

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

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

    def export(self, llm: "MultimodalEmotionLLM", folder: Path) -> list[Path]:
        """A peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) that
        ``PeftModel.from_pretrained(<the same backbone>, folder)`` loads."""
        folder.mkdir(parents=True, exist_ok=True)
        # peft's own names: relative to a PeftModel (base_model.model.<backbone key>), adapter
        # name removed, as PeftModel.save_pretrained writes them.
        state = get_peft_model_state_dict(llm.backbone)
        state = {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}
        weights = folder / SAFETENSORS_WEIGHTS_NAME
        save_file(state, str(weights), metadata={"format": "pt"})
        self.config.save_pretrained(str(folder))
        return [folder / CONFIG_NAME, weights]
