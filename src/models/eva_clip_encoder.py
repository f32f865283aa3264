"""EVA-CLIP-g as Emotion-LLaMA runs it: one frame at 448 px -> ``ln_vision`` -> its two visual
streams, the merged patch tokens ``(256, 5632)`` and the CLS token ``(1408,)``, from one forward.

Emotion-LLaMA (MiniGPT-v2) encodes the clip's first frame, resized to 448 x 448 bicubically and
normalised with CLIP's statistics (BLIP-2's eval processor), with EVA ViT-g
(:mod:`src.models.eva_vit`), then a ``ln_vision`` LayerNorm (eps 1e-5, computed in float32); the
CLS token feeds ``cls_tk_llama_proj``, the 1024 patch tokens four at a time ``llama_proj``
(:func:`~src.models.backbones.emotion_llama.merge_patch_tokens`).

One encoder fills both streams: it names them in ``streams`` and returns ``{stream: tensor}``;
:func:`~src.models.online_features.encode_media` and ``extract`` run it once per batch and give
each stream its part (so the 1B-parameter tower is neither loaded nor run twice). Put it in
``model.init_args.encoders`` (or ``extract --encoders``) under one of the streams it fills.
"""

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from src.core.errors import InvalidInputError, MissingInputError
from src.core.plain_data import PlainValue
from src.models.backbones.emotion_llama import merge_patch_tokens
from src.models.encoders import _FrozenEncoder
from src.models.eva_vit import EVA_VIT_G_URL, EVAViT, EVAViTConfig, load_eva_vit

#: BLIP-2's (and so MiniGPT-v2's) image normalisation: CLIP's statistics.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: The encoder's outputs; ``streams`` maps them to stream names.
OUTPUTS: tuple[str, ...] = ("patches", "cls")
DEFAULT_STREAMS: dict[str, str] = {"patches": "image", "cls": "cls"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIG_KEYS = ("width", "depth", "heads", "mlp_ratio", "patch")


class EVACLIPGEncoder(_FrozenEncoder):
    """Frozen EVA-CLIP-g + ``ln_vision`` on the first sampled frame of each clip.

    Args:
        weights: Local ``eva_vit_g.pth`` (MiniGPT-4's / LAVIS's file, a flat state dict read
            weights-only); never a URL or hub id. ``None``: random weights (tests).
        config: Architecture overrides of :class:`~src.models.eva_vit.EVAViTConfig` (``width``,
            ``depth``, ``heads``, ``mlp_ratio``, ``patch``) for a tiny model in tests; ``None``:
            EVA ViT-g/14 with MiniGPT-4's 39 blocks. ``weights`` or ``config`` is required.
        ln_vision: A ``.pth`` holding ``ln_vision.weight`` / ``ln_vision.bias`` (flat or under
            ``model``: Emotion-LLaMA's released checkpoint when it holds them); ``None``:
            MiniGPT-v2's freshly initialised LayerNorm (weight 1, bias 0), which its
            checkpoints never store because it is frozen.
        image_size: Model input side (448 for Emotion-LLaMA: 1024 patches -> 256 merged).
        image_mean: Normalisation mean (CLIP's, as BLIP-2's eval processor).
        image_std: Normalisation std.
        dtype: Dtype of the tower (``float16`` as MiniGPT-v2's ``vit_precision``); ``ln_vision``
            runs in float32 and the outputs are float32.
        streams: Output (``patches``, ``cls``) -> stream name it fills; default
            ``{patches: image, cls: cls}``, Emotion-LLaMA's stream names.
        freeze: Freeze the weights and keep eval mode (the default).
    """

    def __init__(
        self,
        weights: str | None = None,
        config: dict[str, PlainValue] | None = None,
        ln_vision: str | None = None,
        image_size: int = 448,
        image_mean: tuple[float, float, float] = CLIP_MEAN,
        image_std: tuple[float, float, float] = CLIP_STD,
        dtype: str = "float32",
        streams: dict[str, str] | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        if weights is None and config is None:
            raise InvalidInputError(
                f"EVACLIPGEncoder: give `weights`, the local eva_vit_g.pth (download it from "
                f"{EVA_VIT_G_URL}), or `config` for a random tiny model"
            )
        unknown = sorted(set(config or {}) - set(_CONFIG_KEYS))
        if unknown:
            raise InvalidInputError(f"EVACLIPGEncoder: config keys {unknown}; use {_CONFIG_KEYS}")
        self.streams = dict(DEFAULT_STREAMS if streams is None else streams)
        if not self.streams or set(self.streams) - set(OUTPUTS):
            raise InvalidInputError(
                f"EVACLIPGEncoder: streams maps outputs {list(OUTPUTS)} to stream names, "
                f"got {self.streams}"
            )
        if dtype not in _DTYPES:
            raise InvalidInputError(f"EVACLIPGEncoder: dtype {dtype!r}; use {list(_DTYPES)}")
        self.save_hyperparameters()
        arch = EVAViTConfig(**(config or {}), image_size=image_size)  # type: ignore[arg-type]
        self.model = EVAViT(arch)
        #: Checkpoint keys not loaded (the released file's 40th block).
        self.ignored_keys = load_eva_vit(self.model, weights) if weights is not None else []
        self.model.to(_DTYPES[dtype])
        self.ln_vision = nn.LayerNorm(arch.width)  # MiniGPT's: torch's default eps 1e-5
        if ln_vision is not None:
            self._load_ln_vision(Path(ln_vision))
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(3, 1, 1), persistent=False)
        self._freeze(freeze)
        if freeze:
            self.ln_vision.requires_grad_(False)

    @property
    def output_streams(self) -> tuple[str, ...]:
        """The streams one forward fills (see :func:`~src.models.online_features.encode_media`)."""
        return tuple(self.streams.values())

    def _load_ln_vision(self, path: Path) -> None:
        from src.io.checkpoint_io import load_checkpoint_safely

        if not path.is_file():
            raise MissingInputError(f"EVACLIPGEncoder: ln_vision file not found: {path}")
        state = load_checkpoint_safely(path)
        if isinstance(state.get("model"), dict):
            state = state["model"]
        own = self.ln_vision.state_dict()
        for name, tensor in own.items():
            value = state.get(f"ln_vision.{name}")
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(tensor.shape):
                raise InvalidInputError(
                    f"{path}: missing key 'ln_vision.{name}' of shape {tuple(tensor.shape)}"
                )
            with torch.no_grad():
                tensor.copy_(value)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8`` images ``(B, 3, H, W)`` -> normalised float ``(B, 3, S, S)``: a bicubic
        (antialiased) resize to ``image_size`` squared, as BLIP-2's eval processor."""
        side = self.image_size
        if tuple(frames.shape[-2:]) != (side, side):
            frames = TF.resize(
                frames, [side, side], interpolation=InterpolationMode.BICUBIC, antialias=True
            )
        return (frames.float() / 255.0 - self.mean) / self.std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, S, S)`` -> ``ln_vision`` tokens ``(B, 1 + N, C)`` (float32)."""
        tokens = self.model(images)
        return self.ln_vision(tokens.float())

    def forward(self, frames: torch.Tensor) -> Mapping[str, torch.Tensor]:
        """``{stream: features}`` of frames ``(B, K, 3, H, W)`` (or ``(B, 3, H, W)``): the first
        frame of each clip. ``uint8`` frames are resized and normalised here; float ones must
        be :meth:`preprocess`'s output. Patches ``(B, N / 4, 4 C)``, CLS ``(B, C)``."""
        if frames.ndim == 5:
            frames = frames[:, 0]  # Emotion-LLaMA sees one frame: sample with strategy first
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (B, K, 3, H, W), got {tuple(frames.shape)}")
        with torch.set_grad_enabled(not self.frozen and torch.is_grad_enabled()):
            images = self.preprocess(frames) if frames.dtype == torch.uint8 else frames
            patches, cls = merge_patch_tokens(self.encode(images))
        out = {"patches": patches, "cls": cls}
        return {stream: out[output] for output, stream in self.streams.items()}
