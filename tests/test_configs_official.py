"""The flow's typed structure: the official configs build the official architectures (exact parameter counts on
the meta device), the named presets are those configs, and the constructor refuses what it cannot build."""
import dataclasses

import pytest
import torch

from transformer_flow import PRESETS, FlowConfig, Model, STARFlow_3B_T2I_256, STARFlowV_7B_T2V_480p
from utils.config import load_config, model_kwargs

FLAN_T5_XL_DIM = 2048


@pytest.mark.parametrize("path, vae_factor, preset, expected", [
    ("configs/starflow_3B_t2i_256x256.yaml", 8, STARFlow_3B_T2I_256, 3_858_281_544),
    ("configs/starflow-v_7B_t2v_caus_480p.yaml", 16, STARFlowV_7B_T2V_480p, 6_890_096_528),
])
def test_official_configs_are_the_presets_and_count_exactly(path, vae_factor, preset, expected):
    cfg = load_config(path)
    kwargs = model_kwargs(cfg, cfg.img_size // vae_factor, txt_dim=FLAN_T5_XL_DIM)
    assert FlowConfig.from_kwargs(**kwargs) == preset()
    with torch.device("meta"):
        assert sum(p.numel() for p in Model(**kwargs).parameters()) == expected
        assert sum(p.numel() for p in Model(preset()).parameters()) == expected


def test_presets_by_name_and_overrides():
    small = PRESETS["starflow-3b-t2i-256"](channels=64, layers_per_block=[1, 1, 1, 1, 1, 2], txt_dim=8)
    assert dataclasses.replace(STARFlow_3B_T2I_256(), channels=64, layers_per_block=[1, 1, 1, 1, 1, 2],
                               txt_dim=8) == small
    model = Model(small)
    assert model.config is small and len(model.blocks) == 6


@pytest.mark.parametrize("change, error, match", [
    (dict(norm_type="batch_norm"), ValueError, "norm_type must be one of layer_norm, rms_norm"),
    (dict(seq_order="T2B"), ValueError, "seq_order must be 'L2R' or 'R2L'"),
    (dict(layers_per_block=[1, 2]), ValueError, "layers_per_block has 2 entries for num_blocks=3"),
    (dict(layers_per_block=[1, 1, 0]), ValueError, "the deep step"),
    (dict(temporal_causal=1, seq_order="R2L"), ValueError, "temporal_causal needs seq_order 'L2R'"),
    (dict(channels=40), ValueError, "channels 40 is not a multiple of head_dim 16"),
    (dict(use_pretrained_lm="gemma3_4b"), ValueError, "Gemma top block.*not supported"),
    (dict(use_mm_attn=True), ValueError, "multimodal attention.*not supported"),
    (dict(use_adaln=True), TypeError, "unknown Model keywords: use_adaln"),
])
def test_constructor_refuses_what_it_cannot_build(change, error, match):
    kwargs = dict(in_channels=2, img_size=4, patch_size=1, channels=32, num_blocks=3, layers_per_block=[1, 1, 2],
                  head_dim=16, seq_order="L2R")
    Model(**kwargs, use_pretrained_lm=None, use_mm_attn=False)  # the official constructor's defaults load
    with pytest.raises(error, match=match):
        Model(**dict(kwargs, **change))
