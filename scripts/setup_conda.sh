#!/usr/bin/env bash
# Create a conda environment named starflow (or $1) and install requirements.txt into it.
set -euo pipefail
name=${1:-starflow}
cd "$(dirname "$0")/.."
conda create -y -n "$name" python=3.11
conda run -n "$name" pip install -r requirements.txt
echo "Done. Activate with: conda activate $name"
