#!/usr/bin/env bash
# One node, all its GPUs, DDP. Lightning's own launcher starts one process per GPU; torchrun works
# too (uncomment below). Weights and data are mounted; nothing is downloaded.
#   bash docker/launch_single_node.sh conf/experiment/paper_camer.yaml 8
set -euo pipefail
CONFIG="${1:?config file}"
GPUS="${2:-8}"
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:?set the tracking URI, e.g. sqlite:////shared/mlruns/mlflow.db or http://mlflow:5000}"

docker run --rm --gpus all --ipc=host \
  -e MLFLOW_TRACKING_URI \
  -v /models:/models:ro -v /data:/data:ro -v "$PWD/outputs:/opt/mosear/outputs" \
  mosear:0.1 fit --config "$CONFIG" --trainer conf/trainer/ddp.yaml --trainer.devices "$GPUS"

# Without docker, with torchrun (Lightning picks up the torchrun environment):
# torchrun --standalone --nproc_per_node "$GPUS" -m src.cli fit --config "$CONFIG" \
#   --trainer conf/trainer/ddp.yaml --trainer.devices "$GPUS"
