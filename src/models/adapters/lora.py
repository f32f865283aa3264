"""Plain LoRA through peft: the baseline adapter (Emotion-LLaMA: r=64, alpha=16 on q/v)."""

from pathlib import Path
from typing import TYPE_CHECKING

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import save_file

from src.models.adapters.base import Adapter
from src.models.adapters.targets import check_target_modules, resolve_targets

if TYPE_CHECKING:  # pragma: no cover
    from src.models.multimodal_llm import MultimodalEmotionLLM


class LoRAAdapter(Adapter):
    """peft LoRA injected into the backbone's target linear layers.

    Args:
        r: LoRA rank.
        alpha: LoRA alpha (the update is scaled by ``alpha / r``).
        dropout: Dropout on the LoRA input.
        target_modules: Module names to adapt; ``None``: the backbone family's default (peft's
            mapping: ``q_proj``/``v_proj`` for Llama as Emotion-LLaMA, ``query_key_value`` for
            GPT-NeoX, ``c_attn`` for GPT-2, ...); ``all-linear``: every linear layer but the
            head (:mod:`src.models.adapters.targets`).
        layers: Layer indices to adapt; ``None`` for all.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.05,
        target_modules: list[str] | str | None = None,
        layers: list[int] | None = None,
    ) -> None:
        check_target_modules(target_modules)
        self.target_modules = target_modules
        self.settings = {
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": dropout,
            "layers_to_transform": layers,
            "bias": "none",
        }
        # Fail at config time, not after the backbone is loaded (targets are resolved then).
        self.config = LoraConfig(target_modules=["placeholder"], **self.settings)

    def apply(self, llm: "MultimodalEmotionLLM") -> None:
        targets = resolve_targets(llm.language_model, self.target_modules)
        self.config = LoraConfig(target_modules=targets, **self.settings)
        # inject_adapter_in_model keeps the backbone's own class (no PeftModel wrapper), so
        # generate(), set_attn_implementation() and the attention interface work unchanged.
        llm.backbone.language_model = inject_adapter_in_model(self.config, llm.language_model)
        for name, param in llm.language_model.named_parameters():
            param.requires_grad_("lora_" in name)

    def export(self, llm: "MultimodalEmotionLLM", folder: Path) -> list[Path]:
        """A peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) that
        ``PeftModel.from_pretrained(<the same backbone>, folder)`` loads."""
        folder.mkdir(parents=True, exist_ok=True)
        # peft's own names: relative to a PeftModel (base_model.model.<backbone key>), adapter
        # name removed, as PeftModel.save_pretrained writes them.
        state = get_peft_model_state_dict(llm.language_model)
        state = {f"base_model.model.{k}": v.detach().contiguous() for k, v in state.items()}
        weights = folder / SAFETENSORS_WEIGHTS_NAME
        save_file(state, str(weights), metadata={"format": "pt"})
        self.config.save_pretrained(str(folder))
        return [folder / CONFIG_NAME, weights]
