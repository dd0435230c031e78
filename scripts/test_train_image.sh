#!/usr/bin/env bash
# Quick training run on this CPU: a tiny text-to-image STARFlow on colourised MNIST (embedded, nothing downloaded),
# text from the offline all-MiniLM-L6-v2. Checkpoints, sample grids and metrics go to logs/tiny_image-test_run/.
#   bash scripts/test_train_image.sh [epochs=2] [global_batch=32] [config=configs/tiny_image.yaml] [extra train.py flags...]
# Environment: NGPUS (processes; default: visible GPUs, else 1). With a GPU the same command trains there.
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-2}
batch=${2:-32}
config=${3:-configs/tiny_image.yaml}
extra=("${@:4}")
source scripts/launch.sh
require_count EPOCHS "$epochs"
require_count BATCH "$batch"
require_config "$config"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
echo "config: $config | epochs: $epochs | global batch: $batch | processes: $NGPUS"
"${launch[@]}" train.py \
    --model_config_path "$config" \
    --epochs "$epochs" \
    --batch_size "$batch" \
    --wandb_name test_run \
    "${extra[@]}"
