"""``python -m src.cli export``: a trained model's weights in formats other tools read.

``--config`` is the training config (the run's ``config.yaml`` from MLflow, or the conf files it
was trained with), ``--ckpt_path`` a checkpoint file, ``runs:/...`` or ``models:/...``. Writes
into ``--output`` (a new or empty folder): the adapter's own format (LoRA: a peft adapter folder
for ``PeftModel.from_pretrained``; MoSE: ``mose_adapter.safetensors`` + ``mose_config.json``),
``projectors.safetensors`` (the trainable projectors) and ``export.json`` (what was exported
from where). Layouts: docs/tracking.md.
"""

import argparse
import json
import tempfile
from pathlib import Path

import yaml

#: Keys of a run's saved config that belong to the command, not to the model.
RUN_KEYS = ("ckpt_path", "verbose", "weights_only", "return_predictions")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.cli export",
        description=__doc__,
        epilog="Any other argument (--config FILE, --model.init_args.x ...) builds the model, "
        "as for fit.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint file, runs:/ or models:/")
    parser.add_argument("--output", required=True, help="new or empty folder")
    parser.add_argument("--tracking_uri", default=None, help="for runs:/ and models:/ URIs")
    return parser


def _model_args(argv: list[str], folder: Path) -> list[str]:
    """The model arguments, a run's saved config stripped of its command keys (as a copy)."""
    out = list(argv)
    for i, arg in enumerate(argv[:-1]):
        if arg != "--config":
            continue
        data = yaml.safe_load(Path(argv[i + 1]).read_text())
        if isinstance(data, dict) and any(k in data for k in RUN_KEYS):
            data = {k: v for k, v in data.items() if k not in RUN_KEYS}
            out[i + 1] = str(folder / f"config-{i}.yaml")
            Path(out[i + 1]).write_text(yaml.safe_dump(data))
    return out


def main(argv: list[str]) -> int:
    from safetensors.torch import save_file

    from src.core.errors import InvalidInputError
    from src.io.checkpoint_io import check_checkpoint_fits, load_checkpoint_safely
    from src.lightning_cli import build_cli
    from src.tracking.mlflow_logger import DEFAULT_MLFLOW_DIR, resolve_tracking_uri
    from src.tracking.model_uri import download_checkpoint, is_mlflow_uri

    cfg, model_argv = build_parser().parse_known_args(argv)
    output = Path(cfg.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        # Never written over: a command only writes files it made.
        raise InvalidInputError(f"--output {output}: exists and is not an empty folder")
    ckpt = cfg.ckpt_path
    if is_mlflow_uri(ckpt):
        uri = resolve_tracking_uri(cfg.tracking_uri, DEFAULT_MLFLOW_DIR)
        ckpt = str(download_checkpoint(ckpt, ".", uri))
    with tempfile.TemporaryDirectory() as tmp:
        cli = build_cli([*_model_args(model_argv, Path(tmp)), "--trainer.logger", "false"])
    module = cli.model
    check_checkpoint_fits(module, ckpt)
    state = load_checkpoint_safely(ckpt)["state_dict"]
    module.load_state_dict(state, strict=False)
    output.mkdir(parents=True, exist_ok=True)
    written = module.adapter.export(module.model, output)
    # Everything trainable outside the language model (whose adapter the adapter exported):
    # the backbone's projectors (``model.backbone.projectors.*``).
    inside_lm = "model.backbone.language_model."
    projectors = {
        k: v.detach().contiguous() for k, v in state.items() if not k.startswith(inside_lm)
    }
    if projectors:
        save_file(projectors, str(output / "projectors.safetensors"), metadata={"format": "pt"})
        written.append(output / "projectors.safetensors")
    manifest = {
        "checkpoint": cfg.ckpt_path,
        "adapter": type(module.adapter).__name__,
        "files": [p.name for p in written],
    }
    (output / "export.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"exported {manifest['adapter']} from {cfg.ckpt_path} to {output}: {manifest['files']}")
    return 0
