"""The ablation table: plain LoRA, LoRA+AR, MoSE, MoSE+AR (= MoSEAR) over seeds on CA-MER.

Each seed trains LoRA and MoSE once (same rank r = 8, so MoSE has about 5x LoRA's trainable
parameters; same data, same frozen backbone) and tests the best checkpoint (by validation)
twice: without AR and with the AR callback. Every run is an MLflow run tagged ``method`` and
``seed`` in the experiment ``--experiment``; the script ends by calling ``compare`` (mean ± std
over seeds, CSV, Markdown and a bar chart).

    python experiments/ablation.py                       # synthetic CA-MER default, 3 seeds
    python experiments/ablation.py --seeds 0 1 2 --max_epochs 10 --output outputs/ablation
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from src.cli import main  # noqa: E402

METHOD_CONFIGS = {
    "lora": REPO / "conf/experiment/lora.yaml",
    "mose": REPO / "conf/experiment/mose.yaml",
}
AR_CONFIGS = {
    "lora": REPO / "conf/experiment/lora_ar.yaml",
    "mose": REPO / "conf/experiment/mosear.yaml",
}
AR_NAME = {"lora": "lora+ar", "mose": "mosear"}


def run_seed(method: str, seed: int, args: argparse.Namespace) -> None:
    config = str(METHOD_CONFIGS[method])
    common = [
        "--seed_everything", str(seed),
        "--trainer.max_epochs", str(args.max_epochs),
        "--trainer.logger.init_args.experiment_name", args.experiment,
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    tags = f"{{method: {method}, seed: '{seed}'}}"
    cli = main(["fit", "--config", config, *common, "--trainer.logger.init_args.tags", tags])
    best = cli.trainer.checkpoint_callback.best_model_path
    ar_tags = f"{{method: {AR_NAME[method]}, seed: '{seed}'}}"
    main(["test", "--config", str(AR_CONFIGS[method]), *common,
          "--trainer.logger.init_args.tags", ar_tags, "--ckpt_path", best])  # fmt: skip


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHOD_CONFIGS))
    parser.add_argument("--max_epochs", type=int, default=10)
    parser.add_argument("--experiment", default="ablation")
    parser.add_argument("--output", default="outputs/ablation")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse()
    for seed in args.seeds:
        for method in args.methods:
            run_seed(method, seed, args)
    sys.exit(
        main(
            [
                "compare",
                "--experiments",
                f"[{args.experiment}]",
                "--group_by",
                "tags.method",
                "--output",
                args.output,
            ]
        )  # fmt: skip
    )
