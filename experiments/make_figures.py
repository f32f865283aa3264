"""Regenerate ``docs/figures/`` from the current demo: run ``python -m src.cli fit`` (the
embedded demo, conf/default.yaml) in a scratch folder and copy its MLflow plots.

    python experiments/make_figures.py [--workdir /tmp/mosear-figures] [--out docs/figures]
    python experiments/make_figures.py --workdir <folder of a finished demo run> --reuse

Copied: attention_share.png (AR, per layer), expert_usage.png (MoSE, scale centred on uniform),
modality_following.png (followed audio / visual on conflict samples) and
confusion_test_all.png. The demo is deterministic, so a rerun gives the same plots.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parent.parent
FIGURES = {
    "attention_share.png": "attention_share.png",
    "expert_usage.png": "expert_usage.png",
    "modality_following.png": "modality_following.png",
    "confusion/confusion_test_all.png": "confusion_test_all.png",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: temp)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="copy from the newest fit run already in --workdir instead of running the demo",
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mosear-figures-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    if not args.reuse:
        subprocess.run([sys.executable, "-m", "src.cli", "fit"], cwd=workdir, env=env, check=True)
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mosear")
    (run,) = client.search_runs(
        [experiment.experiment_id],
        "tags.command = 'fit'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    for artifact, name in FIGURES.items():
        local = client.download_artifacts(run.info.run_id, artifact, str(workdir))
        shutil.copyfile(local, args.out / name)
        print(f"{args.out / name}  <- run {run.info.run_id} {artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
