"""The paper's tables on GPUs: a local LLaMA-2-7B-class backbone, bf16, Emotion-LLaMA features.

One sub-command per table; each trains plain LoRA (r=64 on q/v) and MoSE, tests with and without
AR where the table has it, tags every MLflow run with ``method``/``seed``/``fold`` and ends with
``python -m src.cli compare``. Paths in the configs (`/models/...`, `/data/...`) are placeholders:
override them, e.g. ``--set --model.backbone.path /my/llama --data.init_args.root ...``.

    python experiments/paper_tables.py camer   --trainer conf/trainer/ddp.yaml
    python experiments/paper_tables.py mer2023 --trainer conf/trainer/gpu.yaml
    python experiments/paper_tables.py dfew    --folds 1 2 3 4 5
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from src.cli import main  # noqa: E402

MODEL = "conf/model/llama2_7b.yaml"
# The method (conf/method/) with its adapter sized for the 7B backbone (rank 64, alpha 16 on q/v).
METHODS = {"lora": "conf/method/lora.yaml", "mose": "conf/method/mose.yaml"}
ADAPTERS = {"lora": "conf/adapter/lora_7b.yaml", "mose": "conf/adapter/mose_7b.yaml"}
DATA = {
    "camer": "conf/data/camer_real.yaml",
    "mer2023": "conf/data/mer2023.yaml",
    "dfew": "conf/data/dfew.yaml",
}
METRICS = {
    "camer": "[test/video_aligned/acc, test/audio_aligned/acc, test/consistent/acc, "
    "test/modality_gap, test/acc]",
    "mer2023": "[test/f1_weighted, test/acc]",
    "dfew": "[test/uar, test/war]",
}
AR = str(REPO / "conf/callbacks/attention_reallocation.yaml")


def run(table: str, method: str, seed: int, fold: int | None, args: argparse.Namespace) -> None:
    tags = f"{{method: {method}, seed: '{seed}'" + (f", fold: '{fold}'" if fold else "") + "}"
    common = [
        "--seed_everything",
        str(seed),
        "--trainer",
        args.trainer,
        "--model",
        str(REPO / MODEL),
        "--method",
        str(REPO / METHODS[method]),
        "--method.adapter",
        str(REPO / ADAPTERS[method]),
        "--data",
        str(REPO / DATA[table]),
        "--tracking",
        str(REPO / "conf/tracking/mlflow.yaml"),
        "--tracking.logger.init_args.experiment_name",
        f"paper_{table}",
        *([f"--data.init_args.fold={fold}"] if fold else []),
        *args.set,
    ]
    cli = main(["fit", *common, "--tracking.logger.init_args.tags", tags])
    if table == "camer":
        best = cli.trainer.checkpoint_callback.best_model_path
        ar_tags = tags.replace(f"method: {method}", f"method: {method}+ar")
        main(
            [
                "test",
                *common,
                "--tracking.logger.init_args.tags",
                ar_tags,
                "--ckpt_path",
                best,
                f"--trainer.callbacks+={AR}",
            ]
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=list(DATA))
    parser.add_argument("--trainer", default=str(REPO / "conf/trainer/gpu.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--set", nargs=argparse.REMAINDER, default=[], help="extra CLI overrides")
    args = parser.parse_args()
    folds = args.folds if args.table == "dfew" else [None]
    for fold in folds:
        for seed in args.seeds:
            for method in args.methods:
                run(args.table, method, seed, fold, args)
    # DFEW: mean and std over every fold and seed of a method (the five-fold protocol).
    sys.exit(
        main(
            [
                "compare",
                "--experiments",
                f"[paper_{args.table}]",
                "--group_by",
                "tags.method",
                "--metrics",
                METRICS[args.table],
                "--output",
                f"outputs/paper_{args.table}",
            ]
        )
    )
