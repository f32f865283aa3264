"""Emotion-LLaMA (MiniGPT-v2 layout) as a backbone: its five projectors in front of LLaMA-2.

Emotion-LLaMA (Cheng et al., 2024) feeds LLaMA-2-7B-chat, adapted with LoRA on ``q_proj`` and
``v_proj`` (r 64, alpha 16), with five linear projectors:

- ``llama_proj``: EVA-CLIP-g patch tokens of one frame (1024 x 1408 after its ``ln_vision``),
  merged four consecutive tokens at a time into 256 tokens of 5632, one LLM token per row;
- ``feats_llama_proj1`` / ``2`` / ``3``: the 1024-d face-MAE, VideoMAE and HuBERT vectors, one
  token each;
- ``cls_tk_llama_proj``: the EVA-CLIP-g CLS token (1408), one token.

Its training prompt puts the 256 patch tokens at ``<VideoHere>`` and the four others, in the order
face, video, audio, CLS, at ``<FeatureHere>``; here the data module's prompt template places each
stream (``conf/model/emotion_llama.yaml`` holds the released template) and this class fills the
positions. Which stream feeds which projector is the ``roles`` setting. The patch tokens are a
sequence stream stored already merged, ``(256, 5632)``: :func:`merge_patch_tokens` turns an
EVA-CLIP-g output into the two visual streams, as Emotion-LLaMA does inside its forward.

The released checkpoint converts into this class's checkpoint with ``python -m src.cli
convert-emotion-llama`` (:mod:`src.commands.convert_emotion_llama`); its LoRA then loads into a
:class:`~src.models.adapters.lora.LoRAAdapter` of the same rank and alpha. For fine-tuning with
another adapter (MoSE), ``init_from`` names that converted checkpoint: its LoRA is merged into the
frozen LLaMA and its projectors are the starting point.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from src.core.errors import InvalidInputError
from src.core.plain_data import PlainValue
from src.core.streams import StreamSpec
from src.models.backbones.base import EmotionBackbone, require_weights
from src.models.backbones.causal_lm import load_causal_lm

#: The projector that maps every row of the patch-token sequence stream.
PATCH_ROLE = "llama_proj"
#: Emotion-LLaMA's projectors, in the order their tokens follow each other in its prompt.
ROLES: tuple[str, ...] = (
    PATCH_ROLE,
    "feats_llama_proj1",
    "feats_llama_proj2",
    "feats_llama_proj3",
    "cls_tk_llama_proj",
)
#: How many EVA-CLIP patch tokens Emotion-LLaMA merges into one LLM token.
PATCH_MERGE = 4
#: The stream names of ``conf/model/emotion_llama.yaml`` -> projector roles.
DEFAULT_ROLES: dict[str, str] = {
    "image": "llama_proj",
    "face": "feats_llama_proj1",
    "video": "feats_llama_proj2",
    "audio": "feats_llama_proj3",
    "cls": "cls_tk_llama_proj",
}
#: Emotion-LLaMA's prompts in the ``inst`` format (its ``[INST] {} [/INST]`` template and the
#: instruction of its training set, first_face.py): the patch tokens inside ``<video>``, then
#: face, video, audio and CLS inside ``<feature>``, then the subtitle and the task. The label
#: list is the released one (the model saw these words); ``{labels}`` lists the data set's own.
#: (Its ``generate`` path puts all 260 tokens at ``<VideoHere>`` instead; the training layout
#: is the one closed-set scoring, like its ``multi_select``, uses.) The spacing is the released
#: one to the character: ``"The person in video says: {}. "`` and ``"[{task}] {instruction} "``
#: joined by a space, inside ``"[INST] {} [/INST]"``, so two spaces come before ``[emotion]``
#: and before ``[/INST]``; the builder keeps them (SentencePiece gives them their own token).
TEMPLATES: dict[str, str] = {
    "emotion": (
        "[INST] <video> {image} </video> <feature> {face} {video} {audio} {cls} </feature> "
        "The person in video says: {subtitle}.  [emotion] Please determine which emotion label "
        "in the video represents: happy, sad, neutral, angry, worried, surprise, fear, "
        "contempt, doubt.  [/INST]"
    ),
    "reason": (
        "[INST] <video> {image} </video> <feature> {face} {video} {audio} {cls} </feature> "
        "The person in video says: {subtitle}.  [reason] Please analyze all the clues in the "
        "video and reason out the emotional label of the person in the video.  [/INST]"
    ),
}
#: Top-level key of a converted checkpoint describing its LoRA (plain data).
CONVERSION_KEY = "emotion_llama"
#: Prefix of the backbone's tensors in a Lightning checkpoint of EmotionLLMModule.
STATE_PREFIX = "model.backbone."


def merge_patch_tokens(eva_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An EVA-CLIP-g output after ``ln_vision``, ``(B, 1 + N, C)`` with the CLS token first,
    -> the patch stream ``(B, N / 4, 4 C)`` (four consecutive patch tokens concatenated, as
    Emotion-LLaMA merges them) and the CLS stream ``(B, C)``."""
    if eva_tokens.ndim != 3 or (eva_tokens.shape[1] - 1) % PATCH_MERGE:
        raise ValueError(
            f"EVA-CLIP tokens must be (batch, 1 + a multiple of {PATCH_MERGE}, dim), got "
            f"{tuple(eva_tokens.shape)}"
        )
    cls, patches = eva_tokens[:, 0], eva_tokens[:, 1:]
    batch, count, dim = patches.shape
    return patches.reshape(batch, count // PATCH_MERGE, dim * PATCH_MERGE), cls


class EmotionLLaMA(EmotionBackbone):
    """Emotion-LLaMA's projectors (``llama_proj``, ``feats_llama_proj1..3``,
    ``cls_tk_llama_proj``) writing into the input embeddings of a frozen LLaMA-2.

    Args:
        path: Local LLaMA-2-7B-chat directory (or a hub id already in the local Hugging Face
            cache; nothing is downloaded). When given, ``config`` is not used.
        config: Model config kwargs of a randomly initialised LM (tests).
        seed: Seed of that random initialisation.
        dtype: Parameter dtype of the LM (``float32``, ``bfloat16``, ``float16``); the
            projectors stay in float32.
        attn_implementation: transformers attention implementation; ``None``: the default.
        roles: Stream name -> projector role (one of :data:`ROLES`); every stream needs one
            and every role is fed by exactly one stream. The ``llama_proj`` stream is a
            sequence stream (one token per row), the others pooled vectors of one token.
        init_from: A checkpoint written by ``convert-emotion-llama``: its LoRA is merged into
            the frozen LM and its projectors are loaded as initial values, so another adapter
            (MoSE) fine-tunes Emotion-LLaMA. ``None`` (test of the converted checkpoint with
            its own LoRA adapter): the LM is LLaMA-2 as loaded.
    """

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, PlainValue] | None = None,
        seed: int = 0,
        dtype: str = "float32",
        attn_implementation: str | None = None,
        roles: dict[str, str] | None = None,
        init_from: str | None = None,
    ) -> None:
        # Emotion-LLaMA was fine-tuned on Llama-2's [INST] prompts: other formats are refused.
        super().__init__(prompt_format="inst")
        require_weights(path, config, "a local LLaMA-2 directory")
        self.path, self.config, self.seed = path, config, seed
        self.dtype_name, self.attn_implementation = dtype, attn_implementation
        self.roles = dict(DEFAULT_ROLES if roles is None else roles)
        unknown = sorted(set(self.roles.values()) - set(ROLES))
        if unknown:
            raise ValueError(f"model.backbone.roles: unknown roles {unknown}; use {list(ROLES)}")
        self.init_from = init_from
        self.streams: list[StreamSpec] = []

    def settings(self) -> dict[str, PlainValue]:
        return {
            "path": self.path,
            "config": self.config,
            "seed": self.seed,
            "dtype": self.dtype_name,
            "attn_implementation": self.attn_implementation,
            "roles": dict(self.roles),
            "init_from": self.init_from,
        }

    # ---------------------------------------------------------------------------- building
    def build(self, tokenizer: PreTrainedTokenizerBase, streams: Sequence[StreamSpec]) -> None:
        if self.is_built:
            raise RuntimeError(f"{type(self).__name__}.build() was already called")
        self.streams = list(streams)
        self._check_roles()
        recipe = None if self.path is not None else self.config
        self.language_model = load_causal_lm(
            self.path, recipe, len(tokenizer), self.dtype_name, self.attn_implementation,
            self.seed,
        )  # fmt: skip
        hidden = self.hidden_size
        # One attribute per role, so the state dict names them as the released checkpoint does.
        for stream in self.streams:
            self.add_module(self.roles[stream.name], nn.Linear(stream.dim, hidden))
        if self.init_from is not None:
            self._load_initial_weights(Path(self.init_from))

    def _check_roles(self) -> None:
        names = [s.name for s in self.streams]
        missing = [n for n in names if n not in self.roles]
        if missing:
            raise InvalidInputError(
                f"model.backbone.roles has no projector role for streams {missing}: map each "
                f"stream to one of {list(ROLES)}"
            )
        fed = [self.roles[n] for n in names]
        twice = sorted({r for r in fed if fed.count(r) > 1})
        if twice:
            raise InvalidInputError(f"model.backbone.roles: {twice} fed by more than one stream")
        for stream in self.streams:
            patch = self.roles[stream.name] == PATCH_ROLE
            if patch != stream.sequence or (not patch and stream.tokens != 1):
                kind = "a sequence stream" if patch else "a pooled stream of 1 token"
                raise InvalidInputError(
                    f"stream {stream.name!r} feeds {self.roles[stream.name]} and must be {kind} "
                    f"(got sequence={stream.sequence}, tokens={stream.tokens})"
                )

    def _load_initial_weights(self, path: Path) -> None:
        """Projectors and the LoRA (merged into the frozen LM) of a converted checkpoint."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        from src.io.checkpoint_io import load_checkpoint_safely

        checkpoint = load_checkpoint_safely(path)
        state, lora = checkpoint.get("state_dict"), checkpoint.get(CONVERSION_KEY)
        if not isinstance(state, dict) or not isinstance(lora, dict):
            raise InvalidInputError(
                f"model.backbone.init_from {path}: not a checkpoint written by "
                "convert-emotion-llama (no state_dict or no emotion_llama entry)"
            )
        for role in {self.roles[s.name] for s in self.streams}:
            own = getattr(self, role)
            for name, param in own.named_parameters():
                key = f"{STATE_PREFIX}{role}.{name}"
                if key not in state or tuple(state[key].shape) != tuple(param.shape):
                    raise InvalidInputError(
                        f"model.backbone.init_from {path}: {key} is missing or not of shape "
                        f"{tuple(param.shape)}"
                    )
                with torch.no_grad():
                    param.copy_(state[key])
        lm_prefix = f"{STATE_PREFIX}language_model."
        # peft's adapter-file names: relative to a PeftModel, without the adapter name.
        adapter = {
            "base_model.model." + k[len(lm_prefix) :].replace(".default.", "."): v
            for k, v in state.items()
            if k.startswith(lm_prefix) and ".lora_" in k
        }
        config = LoraConfig(
            r=int(lora["r"]), lora_alpha=float(lora["alpha"]),
            target_modules=list(lora["target_modules"]), lora_dropout=0.0, bias="none",
        )  # fmt: skip
        peft_model = get_peft_model(self.language_model, config)
        result = set_peft_model_state_dict(peft_model, adapter)
        absent = [k for k in result.missing_keys if ".lora_" in k]
        if absent or result.unexpected_keys:
            raise InvalidInputError(
                f"model.backbone.init_from {path}: its LoRA does not fit this LM (missing "
                f"{absent[:2]}, unexpected {list(result.unexpected_keys)[:2]})"
            )
        self.language_model = peft_model.merge_and_unload()
        self.language_model.requires_grad_(False)
        self.language_model.eval()

    # ------------------------------------------------------------------------------ running
    def embed(
        self, input_ids: torch.Tensor, stream_ids: torch.Tensor, features: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        embeds = self.input_embeddings()(input_ids)
        for index, stream in enumerate(self.streams):
            projector = getattr(self, self.roles[stream.name])
            x = features[stream.name].to(projector.weight.dtype)  # projectors train in float32
            tokens = projector(x) if stream.sequence else projector(x).unsqueeze(1)
            made_by = f"stream {stream.name!r} ({self.roles[stream.name]})"
            embeds = self.fill_stream(embeds, stream_ids == index, tokens, made_by)
        return embeds

    def modality_parameters(self) -> dict[str, list[nn.Parameter]]:
        return self.by_modality(self.streams, lambda s: getattr(self, self.roles[s.name]))
