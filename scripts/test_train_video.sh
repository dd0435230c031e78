#!/usr/bin/env bash
# Quick training run on this CPU: a tiny STARFlow-V (temporal-causal, frame-local shallow blocks, learnable
# self-denoiser, aspect buckets, fps/noise-level prompts) on generated clips of moving coloured squares.
# The clips (MP4 + .txt captions, 16:9 and 1:1) are written once to $DATA (default /tmp/starflow_tiny_videos).
#   bash scripts/test_train_video.sh [epochs=2] [global_batch=8] [config=configs/tiny_video.yaml] [extra train.py flags...]
# Environment: NGPUS (processes; default: visible GPUs, else 1), DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
epochs=${1:-2}
batch=${2:-8}
config=${3:-configs/tiny_video.yaml}
extra=("${@:4}")
data=${DATA:-/tmp/starflow_tiny_videos}
source scripts/launch.sh
require_count EPOCHS "$epochs"
require_count BATCH "$batch"
require_config "$config"
if [ ! -d "$data" ]; then
    python - "$data" <<'PY'
"""Captioned clips of a coloured square moving across a dark background, 16 frames at 8 fps."""
import os, sys
import imageio
import numpy as np

root = sys.argv[1]
os.makedirs(root + ".tmp", exist_ok=True)
colours = {"red": (230, 40, 30), "green": (40, 210, 60), "blue": (40, 90, 250), "yellow": (250, 230, 40)}
moves = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
n = 0
for (w, h) in ((64, 36), (48, 48)):
    for colour, rgb in colours.items():
        for direction, (dx, dy) in moves.items():
            side = h // 3
            x0, y0 = (w - side) // 2 - dx * w // 4, (h - side) // 2 - dy * h // 4
            clip = np.full((16, h, w, 3), 20, np.uint8)
            for t in range(16):
                x, y = x0 + dx * t * w // 32, y0 + dy * t * h // 32
                clip[t, max(0, y):max(0, y + side), max(0, x):max(0, x + side)] = rgb
            name = os.path.join(root + ".tmp", f"clip{n:03d}")
            imageio.mimwrite(name + ".mp4", clip, fps=8, codec="libx264", macro_block_size=1, quality=9)
            with open(name + ".txt", "w") as f:
                f.write(f"a {colour} square moving {direction}\n")
            n += 1
os.replace(root + ".tmp", root)
print(f"wrote {n} clips to {root}")
PY
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
echo "config: $config | data: $data | epochs: $epochs | global batch: $batch | processes: $NGPUS"
"${launch[@]}" train.py \
    --model_config_path "$config" \
    --data "$data" \
    --epochs "$epochs" \
    --batch_size "$batch" \
    --wandb_name test_run \
    "${extra[@]}"
