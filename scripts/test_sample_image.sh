#!/usr/bin/env bash
# Text-to-image with STARFlow 3B: a 4x2 grid of 8 images at 256x256 (plus single PNGs and JSONs).
#   bash scripts/test_sample_image.sh ["prompt" or prompts.txt] [input_image|none] [extra sample.py flags...]
# The image model has no image conditioning: an input image other than "none" is rejected with a clear error.
# Environment: NGPUS (default: visible GPUs, else 1), CONFIG, CKPT, OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
caption=${1:-"a film still of a cat playing piano"}
input_image=${2:-none}
extra=("${@:3}")
source scripts/launch.sh
require_image "$input_image"
echo "caption: $caption | input image: $input_image | processes: $NGPUS"
config=${CONFIG:-configs/starflow_3B_t2i_256x256.yaml}
ckpt=${CKPT:-ckpts/starflow_3B_t2i_256x256.pth}
require_config "$config"
require_checkpoint "$ckpt"
out=()
[ -n "${OUTPUT_DIR:-}" ] && out=(--output_dir "$OUTPUT_DIR")
NCCL_DEBUG=WARN "${launch[@]}" sample.py \
    --model_config_path "$config" \
    --checkpoint_path "$ckpt" \
    --caption "$caption" \
    --input_image "$input_image" \
    --sample_batch_size 8 \
    --cfg 3.6 \
    --aspect_ratio "1:1" \
    --seed 999 \
    --finetuned_vae none \
    --jacobi 1 --jacobi_th 0.001 --jacobi_block_size 16 \
    "${out[@]}" "${extra[@]}"
