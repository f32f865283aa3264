"""EVA ViT-g/14, the EVA-CLIP-g visual tower of BLIP-2, MiniGPT-4, MiniGPT-v2 and Emotion-LLaMA.

Written from the architecture of the released ``eva_vit_g.pth`` (as MiniGPT-4 / LAVIS build it):

- a 14 x 14 patch-embedding convolution (with bias), a CLS token and an absolute position
  embedding ``(1, 1 + grid**2, width)``; no relative position bias, no rope;
- pre-norm blocks: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, LayerNorm eps 1e-6, no
  layer scale (the g model is built with ``init_values=None``: no ``gamma_1``/``gamma_2``);
- attention: a ``qkv`` Linear without bias, separate ``q_bias`` and ``v_bias`` (the key bias is
  zero), softmax(q k^T / sqrt(head_dim)) v, then ``proj``;
- MLP: ``fc1`` -> exact GELU -> ``fc2``, hidden ``int(width * mlp_ratio)`` (6144 for 1408);
- 39 blocks: MiniGPT-4 builds 39 of the file's 40 and uses the last one's output; no final
  norm (its separate ``ln_vision`` LayerNorm follows, in the encoder).

Drop-path and dropout are training-time only and left out: at eval they are the identity.

:func:`load_eva_vit` reads the file weights-only, interpolates the position embedding from the
checkpoint's grid (16 x 16 at 224 px) to the model's (32 x 32 at 448 px) bicubically with the
CLS entry kept as is (as MiniGPT-4's loader does), ignores (and lists) the blocks beyond
``depth`` and refuses any other unknown or missing key in one line.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from src.core.errors import InvalidInputError, MissingInputError

#: Where MiniGPT-4 / LAVIS download the released weights from (``create_eva_vit_g``).
EVA_VIT_G_URL = (
    "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"
)
#: Tensors of the full 40-block EVA-CLIP tower that MiniGPT-4 does not build (its final norm and
#: head): ignored and listed when a file has them, as MiniGPT-4's non-strict load ignores them.
UNUSED_TOP_LEVEL = ("norm.", "fc_norm.", "head.")
_BLOCK = re.compile(r"blocks\.(\d+)\.")


@dataclass(frozen=True)
class EVAViTConfig:
    """Architecture of an EVA ViT (defaults: MiniGPT-4's EVA ViT-g/14 at 448 px).

    Args:
        width: Token width (1408).
        depth: Blocks built (39 of the released 40).
        heads: Attention heads (16: head size 88).
        mlp_ratio: MLP hidden size over width (4.3637 -> 6144).
        patch: Patch side in pixels (14).
        image_size: Input side in pixels (448: a 32 x 32 grid, 1024 patches).
    """

    width: int = 1408
    depth: int = 39
    heads: int = 16
    mlp_ratio: float = 4.3637
    patch: int = 14
    image_size: int = 448

    def __post_init__(self) -> None:
        if self.width % self.heads or self.image_size % self.patch or self.depth < 1:
            raise ValueError(
                f"EVA ViT config: width {self.width} must divide by heads {self.heads}, "
                f"image_size {self.image_size} by patch {self.patch}, and depth >= 1"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


class EVAAttention(nn.Module):
    """Multi-head self-attention with EVA's bias layout (``q_bias``, zero key bias, ``v_bias``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias.to(self.qkv.weight.dtype))
        q, k, v = qkv.view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(head size), as EVA's
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class EVAMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EVABlock(nn.Module):
    """Pre-norm transformer block without layer scale."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = EVAAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = EVAMlp(width, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, grid**2, width), row-major


class EVAViT(nn.Module):
    """EVA ViT: images ``(B, 3, S, S)`` -> tokens ``(B, 1 + grid**2, width)``, CLS first, the
    last block's output without a final norm. State-dict keys are the released file's.

    Args:
        config: The architecture.
    """

    def __init__(self, config: EVAViTConfig = EVAViTConfig()) -> None:  # noqa: B008 - frozen
        super().__init__()
        self.config = config
        width = config.width
        self.patch_embed = PatchEmbed(width, config.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.grid**2, width))
        self.blocks = nn.ModuleList(
            EVABlock(width, config.heads, config.hidden) for _ in range(config.depth)
        )
        # A random model (tests) with the usual small init; released weights overwrite it.
        for param in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(param, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        side = self.config.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, side, side):
            raise ValueError(f"EVA ViT expects (B, 3, {side}, {side}), got {tuple(images.shape)}")
        x = self.patch_embed(images.to(self.pos_embed.dtype))
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """``(1, 1 + g**2, C)`` -> ``(1, 1 + grid**2, C)``: the patch entries resized bicubically
    (``align_corners=False``, in float32) on their ``g x g`` grid, the CLS entry unchanged."""
    count = pos_embed.shape[1] - 1 if pos_embed.ndim == 3 else 0
    old = math.isqrt(count)
    if old == grid or old * old != count or count == 0:
        return pos_embed  # the same grid, or not a square one (then the shape check refuses)
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:].float()
    width = patches.shape[-1]
    patches = patches.reshape(1, old, old, width).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, width)
    return torch.cat((cls.float(), patches), dim=1)


def load_eva_vit(model: EVAViT, path: str | Path) -> list[str]:
    """Load a released EVA ViT file (``eva_vit_g.pth``: a flat state dict) into ``model``.

    Returns the keys ignored: blocks beyond ``model``'s depth and the unused final norm / head.

    Raises:
        MissingInputError: No such file.
        UnsafeCheckpointError: A pickled object (the file is read weights-only, never run).
        InvalidInputError: An unknown or missing key, or a tensor of another shape.
    """
    from src.io.checkpoint_io import load_checkpoint_safely

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(
            f"EVA ViT weights not found: {path} (download MiniGPT-4's eva_vit_g.pth from "
            f"{EVA_VIT_G_URL} and point `weights` at the local file)"
        )
    state = load_checkpoint_safely(path)
    if isinstance(state.get("model"), dict):  # also a {"model": state_dict} wrapper
        state = state["model"]
    own = model.state_dict()
    kept: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        block = _BLOCK.match(key)
        if (block and int(block[1]) >= model.config.depth) or key.startswith(UNUSED_TOP_LEVEL):
            ignored.append(key)
            continue
        if key not in own:
            raise InvalidInputError(f"{path}: unknown key {key!r} (not EVA ViT's layout)")
        if not isinstance(value, torch.Tensor):
            raise InvalidInputError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
        if key == "pos_embed":
            value = interpolate_pos_embed(value, model.config.grid)
        if tuple(value.shape) != tuple(own[key].shape):
            raise InvalidInputError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model needs "
                f"{tuple(own[key].shape)} (another EVA architecture?)"
            )
        kept[key] = value
    missing = [k for k in own if k not in kept]
    if missing:
        raise InvalidInputError(f"{path}: missing key {missing[0]!r} (not EVA ViT's layout)")
    with torch.no_grad():
        for key, value in kept.items():
            own[key].copy_(value)
    return ignored
