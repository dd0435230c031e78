"""Convert an official STARFlow .pth checkpoint to safetensors, with the resolved config YAML beside it.

    python scripts/convert_checkpoint.py ckpts/starflow_3B_t2i_256x256.pth \\
        --model_config_path configs/starflow_3B_t2i_256x256.yaml
    # -> ckpts/starflow_3B_t2i_256x256.safetensors and ckpts/starflow_3B_t2i_256x256.yaml

The weights are checked against the model the config describes (built on the meta device, so nothing is allocated
and no text encoder or VAE is loaded); a misfit is reported key by key and nothing is written.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformer_flow import DEPRECATED_KEYS  # noqa: E402
from utils.checkpoint import check_fit, load_state_dict_file, save_weights  # noqa: E402
from utils.config import load_config, save_config  # noqa: E402
from utils.recipe import build_model  # noqa: E402
from utils.errors import ArgumentParser, UserError, run_cli  # noqa: E402


def text_dim_of(state):
    """The text encoder width the checkpoint was trained with (input width of its text projection), or 0."""
    dims = {v.shape[1] for k, v in state.items() if k.endswith("proj_txt.weight")}
    return dims.pop() if len(dims) == 1 else 0


def latent_side_of(state, cfg):
    """Latent grid side: only learned position tables depend on it; RoPE models accept any size."""
    table = next((v for k, v in state.items() if k.endswith("pos_embed")), None)
    return math.isqrt(table.shape[0]) * cfg.patch_size if table is not None else cfg.patch_size


def convert(checkpoint, config_path, output=None):
    cfg = load_config(config_path)
    state = {k: v for k, v in load_state_dict_file(checkpoint).items() if not DEPRECATED_KEYS.match(k)}
    with torch.device("meta"):
        model = build_model(cfg, latent_side_of(state, cfg), text_dim_of(state))
    check_fit(model.state_dict(), state, f"checkpoint '{checkpoint}'",
              f"Is {config_path} the config this checkpoint was trained with?")
    output = output or os.path.splitext(checkpoint)[0] + ".safetensors"
    if os.path.abspath(output) == os.path.abspath(checkpoint):
        raise UserError(f"output '{output}' would overwrite the input; pass --output")
    save_weights(state, output, metadata={"format": "pt", "source": os.path.basename(checkpoint)})
    config_out = os.path.splitext(output)[0] + ".yaml"
    save_config(cfg, config_out)
    return output, config_out


def run(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="official .pth (or any weights file)")
    parser.add_argument("--model_config_path", required=True, help="YAML config the checkpoint belongs to")
    parser.add_argument("--output", default=None, help="output .safetensors (default: beside the input)")
    args = parser.parse_args(argv)
    weights, config = convert(args.checkpoint, args.model_config_path, args.output)
    print(f"wrote {weights} and {config}")
    return 0


def main(argv=None):
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
