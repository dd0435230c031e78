"""The two official configs build the official architectures: exact parameter counts on the meta device."""
import pytest
import torch

from transformer_flow import Model
from utils.config import load_config, model_kwargs

FLAN_T5_XL_DIM = 2048


@pytest.mark.parametrize("path, vae_factor, expected", [
    ("configs/starflow_3B_t2i_256x256.yaml", 8, 3_858_281_544),
    ("configs/starflow-v_7B_t2v_caus_480p.yaml", 16, 6_890_096_528),
])
def test_official_parameter_count(path, vae_factor, expected):
    cfg = load_config(path)
    with torch.device("meta"):
        model = Model(**model_kwargs(cfg, cfg.img_size // vae_factor, txt_dim=FLAN_T5_XL_DIM))
    assert sum(p.numel() for p in model.parameters()) == expected
