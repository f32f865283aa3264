"""``python -m src.cli convert-emotion-llama``: Emotion-LLaMA's released checkpoint -> this
framework's checkpoint and configs.

The released ``.pth`` (MiniGPT-v2's layout: ``{"model": state_dict, ...}`` holding the trainable
tensors only) is read with ``torch.load(weights_only=True)``: it is data, and a file holding
anything else is refused. Its keys map onto
:class:`~src.models.backbones.emotion_llama.EmotionLLaMA` and a peft
:class:`~src.models.adapters.lora.LoRAAdapter` as
:class:`~src.models.emotion_module.EmotionLLMModule` names them:

- ``llama_model.base_model.model.<layer>.lora_A[.default].weight`` ->
  ``model.backbone.language_model.<layer>.lora_A.default.weight`` (and ``lora_B``);
- ``llama_proj.*``, ``feats_llama_proj1..3.*``, ``cls_tk_llama_proj.*`` ->
  ``model.backbone.<same>``;
- ``attention.*`` (MiniGPTBase's auxiliary classifier, built but unused by its forward) is left
  out and listed in ``conversion.json``;
- ``ln_vision.*`` (EVA-CLIP-g's output LayerNorm; MiniGPT-v2 keeps it frozen, so released files
  normally lack it) is not part of the LLM checkpoint: with ``--eva_weights`` the written
  configs' EVA-CLIP-g encoder reads it from the released file.

Any other key, or a missing one, ends in one line naming the file and the key. ``--output`` is a
new or empty folder; it receives ``emotion_llama.ckpt``, ``test.yaml`` (the released model with
its own LoRA), ``test_ar.yaml`` (the same with attention reallocation calibrated on the
validation split: the paper's training-free use), ``test_ar_fixed.yaml`` (a fixed AR setting),
``fit_mose.yaml``
(MoSE fine-tuning from it: the LoRA merged into the frozen LLaMA, projectors as the start) and
``conversion.json``.

The configs read all five streams from the feature store, or, with ``--eva_weights`` (a local
MiniGPT-4 ``eva_vit_g.pth``), the two EVA-CLIP-g streams from the raw clips through
:class:`~src.models.eva_clip_encoder.EVACLIPGEncoder` online (``data.source: media``, the
clip's first frame at 448 px, bicubic) while face, video and audio stay stored
(``data.stored_streams``).
"""

import argparse
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
#: The released checkpoint's LoRA keys (peft 0.2 without the adapter name, or with it).
LORA_KEY = re.compile(
    r"llama_model\.base_model\.model\.(?P<module>model\.layers\.(?P<layer>\d+)\.self_attn\."
    r"(?P<target>[a-z_]+))\.lora_(?P<ab>[AB])(?:\.default)?\.weight"
)
#: Modules Emotion-LLaMA builds but never uses in its forward: not converted.
UNUSED_PREFIXES = ("attention.",)
#: EVA-CLIP-g's ``ln_vision`` in the released file, when it is there (read by the encoder).
LN_VISION_KEYS = ("ln_vision.weight", "ln_vision.bias")
#: The streams EVA-CLIP-g fills (its encoder's outputs -> stream names); the others stay stored.
EVA_STREAMS = {"patches": "image", "cls": "cls"}
#: Where each role's stream is read from (folder under the data root), and its modality.
STREAM_LAYOUT = {
    "image": ("eva_clip_g_patches", "visual"),
    "face": ("mae_340_UTT", "visual"),
    "video": ("maeV_399_UTT", "visual"),
    "audio": ("HL-UTT", "audio"),
    "cls": ("eva_clip_g_cls", "visual"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.cli convert-emotion-llama", description=__doc__
    )
    parser.add_argument("--checkpoint", required=True, help="the released Emotion-LLaMA .pth")
    parser.add_argument("--output", required=True, help="a new or empty folder")
    parser.add_argument(
        "--llama", required=True, help="the local LLaMA-2-7B-chat directory (model + tokenizer)"
    )
    parser.add_argument("--lora_alpha", type=float, default=16.0, help="released: 16")
    parser.add_argument("--patch_tokens", type=int, default=256, help="rows of the patch stream")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the frozen LLaMA")
    parser.add_argument(
        "--data", default=str(CONF / "data" / "camer_real.yaml"),
        help="data config the written configs start from (its streams, templates and tokenizer "
        "are replaced by Emotion-LLaMA's)",
    )  # fmt: skip
    parser.add_argument("--trainer", default=str(CONF / "trainer" / "gpu.yaml"))
    parser.add_argument("--tracking", default=str(CONF / "tracking" / "mlflow.yaml"))
    parser.add_argument("--mose_adapter", default=str(CONF / "adapter" / "mose_7b.yaml"))
    parser.add_argument(
        "--eva_weights", default=None,
        help="a local eva_vit_g.pth (MiniGPT-4's EVA ViT-g): the configs then run EVA-CLIP-g "
        "online on the raw clips for the image and cls streams (data.source media); default: "
        "all streams from the feature store",
    )  # fmt: skip
    return parser


def _released_state(path: Path) -> dict[str, Any]:
    """The released tensors (``checkpoint["model"]``, or a flat state dict), weights-only."""
    from src.core.errors import InvalidInputError
    from src.io.checkpoint_io import load_checkpoint_safely

    checkpoint = load_checkpoint_safely(path)
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict):
        raise InvalidInputError(f"{path}: field 'model' is not a state dict")
    for key, value in state.items():
        if not hasattr(value, "shape"):
            raise InvalidInputError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor")
    return state


def convert_state(
    state: dict[str, Any], path: Path, layers: int, hidden: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Released tensors -> ``(state_dict of EmotionLLMModule, LoRA description)``.

    Raises:
        InvalidInputError: A key that is not Emotion-LLaMA's, a missing key or a wrong shape.
    """
    from src.core.errors import InvalidInputError
    from src.models.backbones.emotion_llama import ROLES, STATE_PREFIX

    converted: dict[str, Any] = {}
    targets: set[str] = set()
    ranks: set[int] = set()
    skipped: list[str] = []
    ln_vision: list[str] = []
    for key, value in state.items():
        match = LORA_KEY.fullmatch(key)
        role = key.rsplit(".", 1)[0]
        if match is not None:
            if int(match["layer"]) >= layers:
                raise InvalidInputError(f"{path}: {key}: layer beyond the LLaMA's {layers}")
            targets.add(match["target"])
            ranks.add(int(value.shape[0] if match["ab"] == "A" else value.shape[1]))
            name = f"{match['module']}.lora_{match['ab']}.default.weight"
            converted[f"{STATE_PREFIX}language_model.{name}"] = value
        elif role in ROLES and key.endswith((".weight", ".bias")):
            if value.shape[0] != hidden:
                raise InvalidInputError(
                    f"{path}: {key} maps to {value.shape[0]} features but the LLaMA's hidden "
                    f"size is {hidden}: pass the --llama the checkpoint was trained on"
                )
            converted[STATE_PREFIX + key] = value
        elif key.startswith(UNUSED_PREFIXES):
            skipped.append(key)
        elif key in LN_VISION_KEYS:
            ln_vision.append(key)
        else:
            raise InvalidInputError(f"{path}: unknown key {key!r} (not Emotion-LLaMA's layout)")
    expected = [f"{STATE_PREFIX}{r}.{p}" for r in ROLES for p in ("weight", "bias")]
    if not targets:
        raise InvalidInputError(f"{path}: missing key: no llama_model...lora_A/B weights")
    expected += [
        f"{STATE_PREFIX}language_model.model.layers.{i}.self_attn.{t}.lora_{ab}.default.weight"
        for i in range(layers)
        for t in sorted(targets)
        for ab in "AB"
    ]
    missing = [k for k in expected if k not in converted]
    if missing:
        # Named as the released file names it.
        released = missing[0].replace(
            STATE_PREFIX + "language_model.", "llama_model.base_model.model."
        )
        released = released.replace(STATE_PREFIX, "").replace(".default.weight", ".weight")
        raise InvalidInputError(f"{path}: missing key {released!r}")
    if len(ranks) != 1:
        raise InvalidInputError(f"{path}: LoRA tensors of several ranks {sorted(ranks)}")
    if ln_vision and len(ln_vision) != len(LN_VISION_KEYS):
        absent = next(k for k in LN_VISION_KEYS if k not in ln_vision)
        raise InvalidInputError(f"{path}: missing key {absent!r} (it has {ln_vision[0]!r})")
    lora = {
        "r": ranks.pop(), "target_modules": sorted(targets), "skipped": skipped,
        "ln_vision": sorted(ln_vision),
    }  # fmt: skip
    return converted, lora


def _streams(state: dict[str, Any], patch_tokens: int) -> list[Any]:
    from src.core.streams import StreamSpec
    from src.models.backbones.emotion_llama import DEFAULT_ROLES, PATCH_ROLE, STATE_PREFIX

    streams = []
    for name, role in DEFAULT_ROLES.items():
        folder, modality = STREAM_LAYOUT[name]
        dim = int(state[f"{STATE_PREFIX}{role}.weight"].shape[1])
        patch = role == PATCH_ROLE
        tokens = patch_tokens if patch else 1
        streams.append(StreamSpec(name, folder, modality, dim, tokens, sequence=patch))
    return streams


def _write_yaml(path: Path, data: dict[str, Any], note: str) -> None:
    path.write_text(f"# {note}\n" + yaml.safe_dump(data, sort_keys=False))


def _configs(cfg: argparse.Namespace, ckpt: Path, settings: dict, streams: list, lora: dict):
    """The test, test-with-AR and MoSE fine-tuning experiment configs (plain dicts)."""
    from src.models.backbones.emotion_llama import TEMPLATES

    model = yaml.safe_load((CONF / "model" / "emotion_llama.yaml").read_text())
    model["init_args"]["backbone"]["init_args"] = dict(settings)
    data = yaml.safe_load(Path(cfg.data).read_text())
    data.setdefault("init_args", {}).update(
        {
            "tokenizer": settings["path"],
            "streams": [asdict(s) for s in streams],
            "templates": dict(TEMPLATES),
            "prompt_format": "inst",
        }
    )
    if cfg.eva_weights is not None:
        _online_eva(cfg, model, data["init_args"], streams, lora)
    adapter = {
        "class_path": "src.models.adapters.lora.LoRAAdapter",
        "init_args": {
            "r": lora["r"], "alpha": lora["alpha"], "dropout": 0.05,
            "target_modules": lora["target_modules"],
        },
    }  # fmt: skip
    base = {
        "seed_everything": 0,
        "trainer": str(Path(cfg.trainer).resolve()),
        "model": model,
        "data": data,
        "tracking": str(Path(cfg.tracking).resolve()),
    }
    ar = str(CONF / "callbacks" / "attention_reallocation.yaml")
    calibrated = str(CONF / "callbacks" / "attention_reallocation_calibrated.yaml")
    fit_model = yaml.safe_load(yaml.safe_dump(model))
    fit_model["init_args"]["backbone"]["init_args"]["init_from"] = str(ckpt.resolve())
    return {
        "test.yaml": {**base, "method": {"adapter": adapter, "callbacks": []}},
        "test_ar.yaml": {**base, "method": {"adapter": adapter, "callbacks": [calibrated]}},
        "test_ar_fixed.yaml": {**base, "method": {"adapter": adapter, "callbacks": [ar]}},
        "fit_mose.yaml": {
            **base,
            "model": fit_model,
            "method": {"adapter": str(Path(cfg.mose_adapter).resolve()), "callbacks": []},
        },
    }


def _online_eva(
    cfg: argparse.Namespace, model: dict, data: dict, streams: list, lora: dict
) -> None:
    """EVA-CLIP-g online for the image and cls streams (as Emotion-LLaMA: the first frame,
    squashed to 448 px bicubically); the other streams stay in the feature store."""
    from src.models.eva_clip_encoder import EVACLIPGEncoder

    ln_vision = str(Path(cfg.checkpoint).resolve()) if lora["ln_vision"] else None
    size = 448
    model["init_args"]["encoders"] = {
        EVA_STREAMS["patches"]: {
            "class_path": f"{EVACLIPGEncoder.__module__}.{EVACLIPGEncoder.__qualname__}",
            "init_args": {
                "weights": str(Path(cfg.eva_weights).resolve()), "ln_vision": ln_vision,
                "image_size": size, "streams": dict(EVA_STREAMS),
            },
        }
    }  # fmt: skip
    media = dict(data.get("media") or {})
    media.update(strategy="first", frame_size=size, crop=False, interpolation="bicubic")
    data.update(
        source="media",
        media=media,
        stored_streams=[s.name for s in streams if s.name not in EVA_STREAMS.values()],
    )


def main(argv: list[str]) -> int:
    import lightning
    import torch
    from transformers import AutoConfig

    from src.core.errors import InvalidInputError
    from src.io.atomic import atomic_open
    from src.io.local_weights import resolve_local
    from src.models.backbones.emotion_llama import CONVERSION_KEY, EmotionLLaMA

    cfg = build_parser().parse_args(argv)
    output = Path(cfg.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        # Never written over: a command only writes files it made.
        raise InvalidInputError(f"--output {output}: exists and is not an empty folder")
    source = Path(cfg.checkpoint)
    if cfg.eva_weights is not None and not Path(cfg.eva_weights).is_file():
        from src.models.eva_vit import EVA_VIT_G_URL

        raise InvalidInputError(
            f"--eva_weights {cfg.eva_weights}: not a local file; download MiniGPT-4's "
            f"eva_vit_g.pth ({EVA_VIT_G_URL}) and pass its path"
        )
    llama = resolve_local(cfg.llama, "--llama")
    lm_config = AutoConfig.from_pretrained(str(llama), local_files_only=True)
    state = _released_state(source)
    converted, lora = convert_state(
        state, source, lm_config.num_hidden_layers, lm_config.hidden_size
    )
    lora["alpha"] = cfg.lora_alpha
    streams = _streams(converted, cfg.patch_tokens)
    backbone = EmotionLLaMA(path=str(llama.resolve()), dtype=cfg.dtype)
    settings = backbone.settings()
    checkpoint = {
        "state_dict": converted,
        "hyper_parameters": {
            "_class_path": "src.models.emotion_module.EmotionLLMModule",
            "backbone": {
                "class": f"{EmotionLLaMA.__module__}.{EmotionLLaMA.__qualname__}",
                "settings": settings,
            },
            "length_normalize": True,
            "tokenizer": settings["path"],
            "streams": [asdict(s) for s in streams],
        },
        CONVERSION_KEY: {**lora, "source": str(source.resolve())},
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
    }
    output.mkdir(parents=True, exist_ok=True)
    ckpt = output / "emotion_llama.ckpt"
    with atomic_open(ckpt, "wb") as handle:
        torch.save(checkpoint, handle)
    notes = {
        "test.yaml": "Emotion-LLaMA as released (its LoRA), no attention intervention.",
        "test_ar.yaml": (
            "Emotion-LLaMA as released, attention reallocation calibrated on the validation "
            "split (zero-shot: no training)."
        ),
        "test_ar_fixed.yaml": "Emotion-LLaMA as released, a fixed attention reallocation.",
        "fit_mose.yaml": "MoSE fine-tuning from Emotion-LLaMA (LoRA merged, projectors as start).",
    }
    for name, data in _configs(cfg, ckpt, settings, streams, lora).items():
        _write_yaml(
            output / name, data, f"Written by convert-emotion-llama from {source}. {notes[name]}"
        )
    report = {
        "source": str(source), "checkpoint": ckpt.name, "tensors": len(converted),
        "lora": {k: lora[k] for k in ("r", "alpha", "target_modules")},
        "skipped": lora["skipped"], "streams": [asdict(s) for s in streams],
        "eva_weights": cfg.eva_weights, "ln_vision": lora["ln_vision"],
    }  # fmt: skip
    (output / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"converted {len(converted)} tensors of {source} into {ckpt} (LoRA r {lora['r']}, "
        f"alpha {lora['alpha']:g} on {lora['target_modules']}); test with: python -m src.cli "
        f"test --config {output / 'test.yaml'} --ckpt_path {ckpt}"
    )
    return 0
