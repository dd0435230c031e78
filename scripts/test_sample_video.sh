#!/usr/bin/env bash
# Text-to-video (or image-to-video) with STARFlow-V 7B: one 480x848 video per process at 16 fps, in a grid MP4.
#   bash scripts/test_sample_video.sh ["prompt" or prompts.txt] [input_image|none] [target_length=81] [extra flags...]
# target_length beyond 81 frames (e.g. 161, 241, 481) generates with a sliding window of the training length.
# Environment: NGPUS (default: visible GPUs, else 1; the original used 8), CONFIG, CKPT, OUTPUT_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
caption=${1:-"a corgi dog looks at the camera"}
input_image=${2:-none}
target_length=${3:-81}
extra=("${@:4}")
source scripts/launch.sh
require_count TARGET_LENGTH "$target_length"
require_image "$input_image"
echo "caption: $caption | input image: $input_image | frames: $target_length | processes: $NGPUS"
config=${CONFIG:-configs/starflow-v_7B_t2v_caus_480p.yaml}
ckpt=${CKPT:-ckpts/starflow-v_7B_t2v_caus_480p_v3.pth}
require_config "$config"
require_checkpoint "$ckpt"
out=()
[ -n "${OUTPUT_DIR:-}" ] && out=(--output_dir "$OUTPUT_DIR")
NCCL_DEBUG=WARN "${launch[@]}" sample.py \
    --model_config_path "$config" \
    --checkpoint_path "$ckpt" \
    --caption "$caption" \
    --input_image "$input_image" \
    --target_length "$target_length" \
    --sample_batch_size 1 \
    --cfg 3.5 \
    --aspect_ratio "16:9" \
    --seed 99 \
    --out_fps 16 \
    --finetuned_vae none \
    --disable_learnable_denoiser 0 \
    --jacobi 1 --jacobi_th 0.001 --jacobi_block_size 32 \
    "${out[@]}" "${extra[@]}"
